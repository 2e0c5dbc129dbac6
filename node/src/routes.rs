//! Route capture without iptables: the service CIDR and LB pool are made
//! local to the node (`ip route replace local CIDR dev lo table local`), so
//! the agent can bind each ClusterIP and LB IP and the kernel delivers
//! traffic for them to those listeners. Ranges inside 127.0.0.0/8 (or ::1)
//! are local already, so `strait dev` needs no root.

use std::process::Command;

use ipnet::IpNet;
use tracing::{info, warn};

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
    /// The route was refused for lack of privilege.
    #[error(
        "cannot make {cidr} local (`ip route replace local {cidr} dev lo table local`): {stderr}; \
         run the agent with CAP_NET_ADMIN, add the route yourself, or disable route capture"
    )]
    Permission { cidr: IpNet, stderr: String },
    /// `ip` failed for another reason.
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// The routes this agent installed, removed again by [`RouteCapture::remove`].
#[derive(Debug, Default)]
pub struct RouteCapture {
    installed: Vec<IpNet>,
}

/// Whether every address of `cidr` is loopback, hence local without a route.
pub fn is_loopback(cidr: &IpNet) -> bool {
    match cidr {
        IpNet::V4(n) => n.prefix_len() >= 8 && n.network().octets()[0] == 127,
        IpNet::V6(n) => n.prefix_len() == 128 && n.network().is_loopback(),
    }
}

impl RouteCapture {
    /// Makes each non-loopback range local. Ranges that already have a
    /// `local` route are left as they are (and not removed at shutdown).
    pub fn install<'a>(ranges: impl IntoIterator<Item = &'a IpNet>) -> Result<Self, RouteError> {
        let mut capture = Self::default();
        for cidr in ranges {
            if is_loopback(cidr) {
                continue;
            }
            if already_local(cidr)? {
                info!(%cidr, "range already local, leaving its route alone");
                continue;
            }
            let s = cidr.to_string();
            match ip(&[
                "route", "replace", "local", &s, "dev", "lo", "table", "local",
            ]) {
                Ok(()) => {
                    info!(%cidr, "route capture installed");
                    capture.installed.push(*cidr);
                }
                Err(RouteError::Failed { stderr, .. })
                    if stderr.contains("Operation not permitted")
                        || stderr.contains("Permission denied") =>
                {
                    capture.remove();
                    return Err(RouteError::Permission {
                        cidr: *cidr,
                        stderr,
                    });
                }
                Err(e) => {
                    capture.remove();
                    return Err(e);
                }
            }
        }
        Ok(capture)
    }

    /// Deletes the routes [`install`](Self::install) added.
    pub fn remove(&mut self) {
        for cidr in self.installed.drain(..) {
            let s = cidr.to_string();
            match ip(&["route", "del", "local", &s, "dev", "lo", "table", "local"]) {
                Ok(()) => info!(%cidr, "route capture removed"),
                Err(e) => warn!(%cidr, error = %e, "cannot remove route capture"),
            }
        }
    }
}

fn already_local(cidr: &IpNet) -> Result<bool, RouteError> {
    let s = cidr.to_string();
    let args = [
        "route", "show", "table", "local", "type", "local", "exact", &s,
    ];
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| RouteError::Spawn {
            args: args.join(" "),
            source,
        })?;
    Ok(out.status.success() && !out.stdout.trim_ascii().is_empty())
}

fn ip(args: &[&str]) -> Result<(), RouteError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| RouteError::Spawn {
            args: args.join(" "),
            source,
        })?;
    if out.status.success() {
        Ok(())
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
        let none = RouteCapture::install([p("127.77.0.0/16")].iter()).expect("no-op");
        assert!(none.installed.is_empty());
    }
}
