//! Route capture without iptables: the service CIDR and LB pool are made
//! local to the node (`ip route replace local CIDR dev lo table local`), so
//! the agent can bind each ClusterIP and LB IP and the kernel delivers
//! traffic for them to those listeners. Ranges inside 127.0.0.0/8 (or ::1)
//! are local already, so `strait dev` needs no root. The routes the agent
//! adds are recorded in its data dir, so an agent killed before it could
//! remove them takes them back on its next start.

use std::path::{Path, PathBuf};
use std::process::Command;

use ipnet::IpNet;
use tracing::{info, warn};

/// The file in the data dir listing the routes this agent added.
const RECORD: &str = "captured-routes";

/// Errors installing the capture routes.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// `ip` could not be run.
    #[error("running `ip {args}`: {source}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    /// The range is not local and the agent may not make it so.
    #[error(
        "{cidr} is not local on this node, so its addresses cannot be bound, and making it local \
         (`ip route replace local {cidr} dev lo table local`) was refused: {stderr}; run the agent \
         with CAP_NET_ADMIN or add that route yourself"
    )]
    Permission { cidr: IpNet, stderr: String },
    /// `ip` failed for another reason.
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    /// The record of installed routes cannot be written.
    #[error("recording the captured routes in {}: {source}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The routes this agent installed, removed again by [`RouteCapture::remove`].
#[derive(Debug)]
pub struct RouteCapture {
    installed: Vec<IpNet>,
    record: PathBuf,
}

/// Whether every address of `cidr` is loopback, hence local without a route.
pub fn is_loopback(cidr: &IpNet) -> bool {
    match cidr {
        IpNet::V4(n) => n.prefix_len() >= 8 && n.network().octets()[0] == 127,
        IpNet::V6(n) => n.prefix_len() == 128 && n.network().is_loopback(),
    }
}

impl RouteCapture {
    /// Makes each non-loopback range local. A range that a `local` route
    /// already covers is left as it is and not removed at shutdown, unless
    /// the record in `data_dir` shows that an earlier run of this agent
    /// added that route. Fails, removing what it added, when a range is not
    /// local and the agent lacks the privilege to make it so.
    pub fn install<'a>(
        ranges: impl IntoIterator<Item = &'a IpNet>,
        data_dir: &Path,
    ) -> Result<Self, RouteError> {
        let record = data_dir.join(RECORD);
        let earlier = read_record(&record);
        let mut capture = Self {
            installed: Vec::new(),
            record,
        };
        let ranges: Vec<&IpNet> = ranges.into_iter().filter(|c| !is_loopback(c)).collect();
        if ranges.is_empty() && earlier.is_empty() {
            return Ok(capture);
        }
        let local = local_routes()?;
        for cidr in ranges {
            if local.contains(cidr) && earlier.contains(cidr) {
                info!(%cidr, "taking back the route capture an earlier run installed");
                capture.installed.push(*cidr);
                continue;
            }
            if let Some(route) = local.iter().find(|r| r.contains(cidr)) {
                info!(%cidr, %route, "range already local, leaving its route alone");
                continue;
            }
            if let Err(e) = capture.add(cidr) {
                capture.remove();
                return Err(e);
            }
        }
        // Routes an earlier run added for ranges this run does not use.
        for cidr in earlier {
            if local.contains(&cidr) && !capture.installed.contains(&cidr) {
                capture.remove_one(cidr);
            }
        }
        capture.installed.sort();
        capture.installed.dedup();
        capture.save()?;
        Ok(capture)
    }

    fn add(&mut self, cidr: &IpNet) -> Result<(), RouteError> {
        let s = cidr.to_string();
        match ip(&[
            "route", "replace", "local", &s, "dev", "lo", "table", "local",
        ]) {
            Ok(_) => {
                info!(%cidr, "route capture installed");
                self.installed.push(*cidr);
                // Recorded at once: a kill right after must not orphan it.
                self.save()
            }
            Err(RouteError::Failed { stderr, .. })
                if stderr.contains("Operation not permitted")
                    || stderr.contains("Permission denied") =>
            {
                Err(RouteError::Permission {
                    cidr: *cidr,
                    stderr,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes the routes [`install`](Self::install) added.
    pub fn remove(&mut self) {
        for cidr in std::mem::take(&mut self.installed) {
            self.remove_one(cidr);
        }
        if let Err(e) = self.save() {
            warn!(error = %e, "cannot update the record of captured routes");
        }
    }

    fn remove_one(&mut self, cidr: IpNet) {
        self.installed.retain(|c| *c != cidr);
        let s = cidr.to_string();
        match ip(&["route", "del", "local", &s, "dev", "lo", "table", "local"]) {
            Ok(_) => info!(%cidr, "route capture removed"),
            Err(e) => warn!(%cidr, error = %e, "cannot remove route capture"),
        }
    }

    /// Writes the record of installed routes (removes it when there are none).
    fn save(&self) -> Result<(), RouteError> {
        let err = |source| RouteError::Record {
            path: self.record.clone(),
            source,
        };
        if self.installed.is_empty() {
            return match std::fs::remove_file(&self.record) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(err(e)),
                _ => Ok(()),
            };
        }
        if let Some(dir) = self.record.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let text: String = self.installed.iter().map(|c| format!("{c}\n")).collect();
        crate::fsutil::write_atomically(&self.record, text.as_bytes()).map_err(err)
    }
}

/// The ranges an earlier run recorded; a missing or unreadable record is
/// empty, and lines that are not CIDRs are skipped.
fn read_record(path: &Path) -> Vec<IpNet> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Every `local` route in the kernel's local table, IPv4 and IPv6 (a bare
/// address is a host route).
fn local_routes() -> Result<Vec<IpNet>, RouteError> {
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        let out = ip(&[family, "route", "show", "table", "local", "type", "local"])?;
        routes.extend(parse_local_routes(&out));
    }
    Ok(routes)
}

/// The destinations of `ip route show table local type local` output:
/// lines such as `local 10.96.0.0/12 dev lo scope host`.
fn parse_local_routes(text: &str) -> Vec<IpNet> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "local").then_some(())?;
            let dest = words.next()?;
            dest.parse::<IpNet>()
                .ok()
                .or_else(|| dest.parse::<std::net::IpAddr>().ok().map(IpNet::from))
        })
        .collect()
}

/// Runs `ip` with `args`; its standard output when it succeeds.
fn ip(args: &[&str]) -> Result<String, RouteError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| RouteError::Spawn {
            args: args.join(" "),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(RouteError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_ranges_need_no_route() {
        let p = |s: &str| s.parse::<IpNet>().expect("cidr");
        assert!(is_loopback(&p("127.77.0.0/16")));
        assert!(is_loopback(&p("127.0.0.0/8")));
        assert!(!is_loopback(&p("10.96.0.0/12")));
        assert!(!is_loopback(&p("0.0.0.0/0")));
        assert!(is_loopback(&p("::1/128")));
        let dir = tempfile::tempdir().expect("tempdir");
        let none = RouteCapture::install([p("127.77.0.0/16")].iter(), dir.path()).expect("no-op");
        assert!(none.installed.is_empty());
        assert!(!dir.path().join(RECORD).exists());
    }

    #[test]
    fn local_routes_are_read_from_ip_route_output() {
        let out = "local 10.96.0.0/12 dev lo scope host \n\
                   local 127.0.0.1 dev lo proto kernel scope host src 127.0.0.1 \n\
                   local fd00::2 dev eth0 proto kernel metric 0 pref medium\n\
                   broadcast 127.255.255.255 dev lo proto kernel scope link src 127.0.0.1\n";
        let want: Vec<IpNet> = ["10.96.0.0/12", "127.0.0.1/32", "fd00::2/128"]
            .iter()
            .map(|s| s.parse().expect("cidr"))
            .collect();
        assert_eq!(parse_local_routes(out), want);
    }

    #[test]
    fn a_damaged_record_is_read_as_far_as_it_parses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(RECORD);
        std::fs::write(&path, "10.96.0.0/12\ngarbage\n192.0.2.0/28").expect("write");
        let want: Vec<IpNet> = ["10.96.0.0/12", "192.0.2.0/28"]
            .iter()
            .map(|s| s.parse().expect("cidr"))
            .collect();
        assert_eq!(read_record(&path), want);
        assert!(read_record(&dir.path().join("missing")).is_empty());
    }
}
