//! `labelSelector` and `fieldSelector` of list and watch requests, with the syntax and
//! the node fields kube-apiserver accepts.

use serde_json::Value;

use super::status::Status;

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// Which objects a list or watch returns. Empty: all of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

/// Node fields kube-apiserver allows in a field selector.
const NODE_FIELDS: [&str; 3] = ["metadata.name", "metadata.namespace", "spec.unschedulable"];

impl Filter {
    pub fn parse(
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Self, Status> {
        let labels = match label_selector {
            Some(s) => parse_requirements(s, true)
                .map_err(|e| Status::bad_request(format!("unable to parse requirement: {e}")))?,
            None => Vec::new(),
        };
        let fields = match field_selector {
            Some(s) => parse_requirements(s, false)
                .map_err(|e| Status::bad_request(format!("invalid field selector {s:?}: {e}")))?,
            None => Vec::new(),
        };
        for requirement in &fields {
            let key = requirement.key();
            if !NODE_FIELDS.contains(&key) {
                return Err(Status::bad_request(format!(
                    "field label not supported: {key}"
                )));
            }
        }
        Ok(Filter { labels, fields })
    }

    /// A filter on the object name alone (`/watch/nodes/{name}`).
    pub fn name(name: &str) -> Self {
        Filter {
            labels: Vec::new(),
            fields: vec![Requirement::Equals("metadata.name".into(), name.into())],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        let field = |key: &str| -> Option<String> {
            match key {
                "metadata.name" => object
                    .pointer("/metadata/name")?
                    .as_str()
                    .map(str::to_string),
                "metadata.namespace" => Some(
                    object
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                ),
                "spec.unschedulable" => Some(
                    object
                        .pointer("/spec/unschedulable")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                        .to_string(),
                ),
                _ => None,
            }
        };
        self.labels.iter().all(|r| r.matches(label(r.key())))
            && self
                .fields
                .iter()
                .all(|r| r.matches(field(r.key()).as_deref()))
    }
}

impl Requirement {
    fn key(&self) -> &str {
        match self {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k,
        }
    }

    fn matches(&self, value: Option<&str>) -> bool {
        match self {
            Requirement::Equals(_, v) => value == Some(v.as_str()),
            Requirement::NotEquals(_, v) => value != Some(v.as_str()),
            Requirement::In(_, vs) => value.is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(_, vs) => !value.is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::Exists(_) => value.is_some(),
            Requirement::DoesNotExist(_) => value.is_none(),
        }
    }
}

/// Splits on commas outside parentheses (`a in (x,y),b` is two requirements).
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_requirements(s: &str, set_based: bool) -> Result<Vec<Requirement>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    split_top_level(s)
        .into_iter()
        .map(|part| parse_requirement(part.trim(), set_based))
        .collect()
}

fn parse_requirement(part: &str, set_based: bool) -> Result<Requirement, String> {
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    let check = |k: &str| {
        if valid_key(k) {
            Ok(k.to_string())
        } else {
            Err(format!("invalid key {k:?} in {part:?}"))
        }
    };
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(Requirement::NotEquals(check(k.trim())?, v.trim().into()));
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Requirement::Equals(check(k.trim())?, v.trim().into()));
    }
    if !set_based {
        return Err(format!("{part:?}: expected key=value or key!=value"));
    }
    let set = |rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("{part:?}: expected a parenthesised set of values"))?;
        Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    let words: Vec<&str> = part.splitn(2, char::is_whitespace).collect();
    match words.as_slice() {
        [k, rest] if rest.trim_start().starts_with("notin") => Ok(Requirement::NotIn(
            check(k)?,
            set(&rest.trim_start()["notin".len()..])?,
        )),
        [k, rest] if rest.trim_start().starts_with("in") => Ok(Requirement::In(
            check(k)?,
            set(&rest.trim_start()["in".len()..])?,
        )),
        [k] => match k.strip_prefix('!') {
            Some(k) => Ok(Requirement::DoesNotExist(check(k)?)),
            None => Ok(Requirement::Exists(check(k)?)),
        },
        _ => Err(format!("{part:?}: unknown operator")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_and_field_selectors_match_like_kubernetes() {
        let node = json!({"metadata": {"name": "n1", "labels": {"role": "worker", "zone": "a"}}});
        let m = |l: Option<&str>, f: Option<&str>| Filter::parse(l, f).unwrap().matches(&node);
        assert!(m(Some("role=worker,zone in (a, b)"), None));
        assert!(m(Some("role==worker,!gpu,zone"), Some("metadata.name=n1")));
        assert!(!m(Some("role!=worker"), None));
        assert!(!m(Some("zone notin (a)"), None));
        assert!(!m(None, Some("metadata.name=n2")));
        assert!(m(None, Some("spec.unschedulable=false")));
        assert!(Filter::parse(None, Some("status.phase=Ready")).is_err());
        assert!(Filter::parse(Some("a in x"), None).is_err());
    }
}
