//! Which Ethernet interfaces the machine has, and their MAC addresses.

use super::config::Select;
use super::NetworkError;
use std::path::Path;

/// Physical Ethernet interfaces under `<root>/sys/class/net`, by name: type 1 (ARPHRD_ETHER)
/// with a `device` link (which bridges, veths and other virtual interfaces lack).
pub fn ethernet_interfaces(root: &Path) -> Vec<String> {
    let dir = root.join("sys/class/net");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    let d = dir.join(n);
                    std::fs::read_to_string(d.join("type")).is_ok_and(|t| t.trim() == "1")
                        && d.join("device").exists()
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The MAC address in `<root>/sys/class/net/<name>/address`.
pub fn mac_address(root: &Path, name: &str) -> Result<[u8; 6], NetworkError> {
    let path = root.join("sys/class/net").join(name).join("address");
    let fail = |message: String| NetworkError::Mac {
        interface: name.to_string(),
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| fail(e.to_string()))?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| fail(format!("{:?}: {e}", text.trim())))?;
    bytes
        .try_into()
        .map_err(|_| fail(format!("{:?} is not 6 bytes", text.trim())))
}

/// The interface `sel` names, if the machine has it now: by name, or any interface under
/// `<root>/sys/class/net` whose address is the MAC.
pub fn find(root: &Path, sel: &Select) -> Option<String> {
    match sel {
        Select::Name(n) => root
            .join("sys/class/net")
            .join(n)
            .exists()
            .then(|| n.clone()),
        Select::Mac(mac) => {
            let rd = std::fs::read_dir(root.join("sys/class/net")).ok()?;
            let mut names: Vec<String> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| mac_address(root, n).is_ok_and(|m| m == *mac))
                .collect();
            names.sort();
            names.into_iter().next()
        }
    }
}

/// The main interface among `candidates` (in order): the first whose link is up
/// (`carrier` 1), else the first.
pub fn pick(root: &Path, candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .find(|n| crate::netdev::carrier(root, n))
        .or_else(|| candidates.first())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_first_physical_ethernet_interface() {
        let tmp = tempfile::tempdir().unwrap();
        let net = tmp.path().join("sys/class/net");
        for (name, ty, device) in [
            ("lo", "772", false),
            ("eth1", "1", true),
            ("eth0", "1", true),
            ("br0", "1", false),
            ("enp0s3", "1", true),
        ] {
            std::fs::create_dir_all(net.join(name)).unwrap();
            std::fs::write(net.join(name).join("type"), format!("{ty}\n")).unwrap();
            if device {
                std::fs::create_dir_all(net.join(name).join("device")).unwrap();
            }
        }
        assert_eq!(ethernet_interfaces(tmp.path()), ["enp0s3", "eth0", "eth1"]);
        std::fs::write(net.join("eth0/address"), "52:54:00:12:34:56\n").unwrap();
        assert_eq!(
            mac_address(tmp.path(), "eth0").unwrap(),
            crate::dhcp::tests::MAC
        );
        std::fs::write(net.join("eth1/address"), "52:54:00\n").unwrap();
        assert!(mac_address(tmp.path(), "eth1").is_err());
    }

    #[test]
    fn finds_by_name_or_mac_and_prefers_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let net = tmp.path().join("sys/class/net");
        for (name, mac, carrier) in [
            ("eth0", "52:54:00:00:00:01", "0"),
            ("eth1", "52:54:00:00:00:02", "1"),
            ("eth2", "52:54:00:00:00:03", "1"),
        ] {
            std::fs::create_dir_all(net.join(name)).unwrap();
            std::fs::write(net.join(name).join("address"), format!("{mac}\n")).unwrap();
            std::fs::write(net.join(name).join("carrier"), format!("{carrier}\n")).unwrap();
        }
        let root = tmp.path();
        let mac = |last| Select::Mac([0x52, 0x54, 0, 0, 0, last]);
        assert_eq!(find(root, &mac(2)).as_deref(), Some("eth1"));
        assert_eq!(find(root, &mac(9)), None);
        assert_eq!(
            find(root, &Select::Name("eth2".into())).as_deref(),
            Some("eth2")
        );
        assert_eq!(find(root, &Select::Name("eth7".into())), None);
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // eth0 has no link: the first with one wins; without any link, the first.
        assert_eq!(
            pick(root, &names(&["eth0", "eth1", "eth2"])).as_deref(),
            Some("eth1")
        );
        assert_eq!(
            pick(root, &names(&["eth0", "eth2"])).as_deref(),
            Some("eth2")
        );
        std::fs::write(net.join("eth2/carrier"), "0\n").unwrap();
        assert_eq!(
            pick(root, &names(&["eth0", "eth2"])).as_deref(),
            Some("eth0")
        );
        assert_eq!(pick(root, &[]), None);
    }
}
