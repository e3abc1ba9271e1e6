//! flannel's subnet.env: what the CNI plugin (and docker's mk-docker-opts.sh) read.

use std::collections::HashMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use ipnetwork::Ipv4Network;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Network,
    /// The lease, written as its first usable address (`10.244.1.1/24`), as flannel does.
    pub subnet: Ipv4Network,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    pub fn render(&self) -> String {
        let first = Ipv4Addr::from(u32::from(self.subnet.network()) + 1);
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            first,
            self.subnet.prefix(),
            self.mtu,
            self.ipmasq
        )
    }

    /// Writes the file atomically (temp file in the same directory, fsync, rename), so a
    /// reader never sees half a file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("subnet.env")
        ));
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(self.render().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }

    /// Parses subnet.env text. Errors name the missing or malformed key.
    pub fn parse(text: &str) -> Result<SubnetEnv> {
        let vars: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.trim().split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let get = |k: &str| {
            vars.get(k)
                .copied()
                .with_context(|| format!("{k} is missing"))
        };
        let network: Ipv4Network = get("FLANNEL_NETWORK")?
            .parse()
            .context("FLANNEL_NETWORK is not a CIDR")?;
        let subnet: Ipv4Network = get("FLANNEL_SUBNET")?
            .parse()
            .context("FLANNEL_SUBNET is not a CIDR")?;
        let subnet = Ipv4Network::new(subnet.network(), subnet.prefix())?;
        let mtu = get("FLANNEL_MTU")?
            .parse()
            .context("FLANNEL_MTU is not a number")?;
        let ipmasq = get("FLANNEL_IPMASQ")?
            .parse()
            .context("FLANNEL_IPMASQ is not true or false")?;
        Ok(SubnetEnv {
            network,
            subnet,
            mtu,
            ipmasq,
        })
    }

    /// Reads the file; `Ok(None)` when it does not exist.
    pub fn read(path: &Path) -> Result<Option<SubnetEnv>> {
        match std::fs::read_to_string(path) {
            Ok(text) => SubnetEnv::parse(&text)
                .map(Some)
                .with_context(|| format!("{} is malformed", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_format_round_trip() {
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: true,
        };
        let text = env.render();
        assert_eq!(
            text,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(&text).unwrap(), env);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/subnet.env");
        env.write(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), Some(env));
        assert_eq!(SubnetEnv::read(&dir.path().join("none")).unwrap(), None);
        let bad = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\n").unwrap_err();
        assert!(format!("{bad:#}").contains("FLANNEL_SUBNET is missing"));
    }
}
