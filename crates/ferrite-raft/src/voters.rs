//! Kafka's `controller.quorum.voters`: `id@host:port` entries separated by commas,
//! e.g. `1@127.0.0.11:9093,2@127.0.0.12:9093,3@127.0.0.13:9093` (an IPv6 host in
//! brackets, `1@[::1]:9093`). The voter set is fixed by this configuration.

use std::collections::BTreeSet;
use std::fmt;

use crate::NodeId;

/// Most voters a quorum may have. Kafka runs 3 or 5; more only slows commits.
pub const QUORUM_VOTERS_MAX: usize = 9;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Voter {
    pub id: NodeId,
    /// Host name or IP address, without brackets.
    pub host: String,
    pub port: u16,
}

impl Voter {
    /// The `host:port` string to connect to (brackets around an IPv6 address).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Voter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id, self.address())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VotersError {
    #[error("controller.quorum.voters is empty")]
    Empty,
    #[error("controller.quorum.voters entry `{entry}`: {reason}")]
    Entry { entry: String, reason: String },
    #[error("controller.quorum.voters names node {0} twice")]
    DuplicateId(NodeId),
    #[error(
        "controller.quorum.voters lists {0} voters, at most {QUORUM_VOTERS_MAX} are supported"
    )]
    TooMany(usize),
}

/// Parses `controller.quorum.voters`. Ids are Kafka node ids (0..=i32::MAX); the result
/// is sorted by id.
pub fn parse_voters(s: &str) -> Result<Vec<Voter>, VotersError> {
    let mut voters = Vec::new();
    let mut ids = BTreeSet::new();
    for raw in s.split(',').map(str::trim) {
        if raw.is_empty() {
            if s.trim().is_empty() {
                return Err(VotersError::Empty);
            }
            return Err(VotersError::Entry {
                entry: raw.to_string(),
                reason: "empty entry".into(),
            });
        }
        let voter = parse_voter(raw).map_err(|reason| VotersError::Entry {
            entry: raw.to_string(),
            reason,
        })?;
        if !ids.insert(voter.id) {
            return Err(VotersError::DuplicateId(voter.id));
        }
        voters.push(voter);
    }
    if voters.len() > QUORUM_VOTERS_MAX {
        return Err(VotersError::TooMany(voters.len()));
    }
    voters.sort();
    Ok(voters)
}

fn parse_voter(raw: &str) -> Result<Voter, String> {
    let (id, endpoint) = raw
        .split_once('@')
        .ok_or_else(|| "expected id@host:port".to_string())?;
    let id: i32 = id
        .trim()
        .parse()
        .map_err(|_| format!("node id `{id}` is not an integer"))?;
    if id < 0 {
        return Err(format!("node id {id} is negative"));
    }
    let (host, port) = if let Some(rest) = endpoint.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "unclosed `[` in IPv6 host".to_string())?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| "expected :port after the IPv6 host".to_string())?;
        (host, port)
    } else {
        endpoint
            .rsplit_once(':')
            .ok_or_else(|| "expected host:port".to_string())?
    };
    if host.is_empty() {
        return Err("empty host".into());
    }
    if host.contains(['@', '[', ']', ' ']) || (host.contains(':') && !endpoint.starts_with('[')) {
        return Err(format!("invalid host `{host}`"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port `{port}` is not a number from 0 to 65535"))?;
    if port == 0 {
        return Err("port 0 is not a reachable port".into());
    }
    Ok(Voter {
        id: id as NodeId,
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn parses_kafkas_format() {
        let v = parse_voters("3@127.0.0.13:9093, 1@127.0.0.11:9093,2@localhost:19093").unwrap();
        assert_eq!(
            v.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec![
                "1@127.0.0.11:9093",
                "2@localhost:19093",
                "3@127.0.0.13:9093"
            ]
        );
        assert_eq!(v[1].host, "localhost");
        assert_eq!(v[1].port, 19093);
        let one = parse_voters("0@[::1]:9093").unwrap();
        assert_eq!(
            one,
            vec![Voter {
                id: 0,
                host: "::1".into(),
                port: 9093
            }]
        );
        assert_eq!(one[0].address(), "[::1]:9093");
    }

    #[test]
    fn refuses_what_kafka_refuses() {
        let bad = [("", VotersError::Empty), ("  ", VotersError::Empty)];
        for (input, err) in bad {
            assert_eq!(parse_voters(input), Err(err), "{input:?}");
        }
        for input in [
            "1@host",
            "1host:9093",
            "x@host:9093",
            "-1@host:9093",
            "1@:9093",
            "1@host:",
            "1@host:70000",
            "1@host:0",
            "1@::1:9093",
            "1@[::1]9093",
            "1@[::1:9093",
            "1@a:1,,2@b:2",
            "1@a:1,",
            "2147483648@a:1",
        ] {
            assert!(
                matches!(parse_voters(input), Err(VotersError::Entry { .. })),
                "{input:?} gave {:?}",
                parse_voters(input)
            );
        }
        assert_eq!(
            parse_voters("1@a:1,1@b:2"),
            Err(VotersError::DuplicateId(1))
        );
        let many = (0..10)
            .map(|i| format!("{i}@h:{}", 9000 + i))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(parse_voters(&many), Err(VotersError::TooMany(10)));
    }
}
