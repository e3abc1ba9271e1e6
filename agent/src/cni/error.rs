//! The CNI error result: what a plugin prints on stdout, with exit code 1, when it fails.

use serde_json::json;

/// Error codes reserved by the CNI specification.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// A transient condition (e.g. the agent has not written subnet.env yet): retry later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const INTERNAL: u32 = 999;
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The error result JSON; `details` is left out when empty, as the spec allows.
    pub fn to_json(&self, cni_version: &str) -> String {
        let mut value = json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            value["details"] = json!(self.details);
        }
        value.to_string()
    }
}
