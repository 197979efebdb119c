//! KIP-392: which replica a consumer should fetch from. Kafka's
//! `RackAwareReplicaSelector` over the candidates `ReplicaManager.findPreferredReadReplica`
//! offers it: the leader, and each in-sync follower that has the fetch offset.

use crate::BrokerId;

/// A replica the leader may send a consumer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReplica {
    pub broker_id: BrokerId,
    pub rack: Option<String>,
    /// As the leader last saw it (the leader's own for the leader).
    pub log_end_offset: i64,
}

/// The follower a consumer in `client_rack` should read from instead of the leader, or
/// `None` to keep reading from the leader: no rack given, the leader is in that rack, or
/// no in-sync follower there has reached `fetch_offset`. Among several followers of the
/// rack, the one furthest ahead, then the lowest id (a stable answer for the same
/// state, where Kafka's `max` on equal replicas keeps whichever it met first).
pub fn preferred_read_replica(
    client_rack: &str,
    leader: &ReadReplica,
    in_sync_followers: &[ReadReplica],
    fetch_offset: i64,
) -> Option<BrokerId> {
    if client_rack.is_empty() || leader.rack.as_deref() == Some(client_rack) {
        return None;
    }
    in_sync_followers
        .iter()
        .filter(|f| {
            f.broker_id != leader.broker_id
                && f.rack.as_deref() == Some(client_rack)
                && f.log_end_offset >= fetch_offset
        })
        .max_by(|a, b| {
            a.log_end_offset
                .cmp(&b.log_end_offset)
                .then(b.broker_id.cmp(&a.broker_id))
        })
        .map(|f| f.broker_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: BrokerId, rack: Option<&str>, leo: i64) -> ReadReplica {
        ReadReplica {
            broker_id: id,
            rack: rack.map(str::to_string),
            log_end_offset: leo,
        }
    }

    #[test]
    fn a_follower_in_the_clients_rack_is_preferred() {
        let leader = r(1, Some("a"), 100);
        let followers = [r(2, Some("b"), 100), r(3, Some("c"), 100)];
        assert_eq!(
            preferred_read_replica("b", &leader, &followers, 50),
            Some(2)
        );
        assert_eq!(
            preferred_read_replica("c", &leader, &followers, 100),
            Some(3)
        );
    }

    #[test]
    fn the_leader_keeps_the_consumer_when_it_is_the_better_choice() {
        let leader = r(1, Some("a"), 100);
        let followers = [r(2, Some("a"), 100), r(3, Some("b"), 40)];
        // The leader's own rack: no redirection.
        assert_eq!(preferred_read_replica("a", &leader, &followers, 10), None);
        // No rack given, or no replica in that rack.
        assert_eq!(preferred_read_replica("", &leader, &followers, 10), None);
        assert_eq!(preferred_read_replica("z", &leader, &followers, 10), None);
        // The rack's follower has not reached the fetch offset.
        assert_eq!(preferred_read_replica("b", &leader, &followers, 41), None);
        assert_eq!(
            preferred_read_replica("b", &leader, &followers, 40),
            Some(3)
        );
        // A leader without a rack does not match an empty one.
        let rackless = r(1, None, 100);
        assert_eq!(
            preferred_read_replica("b", &rackless, &followers, 40),
            Some(3)
        );
    }

    #[test]
    fn among_followers_of_one_rack_the_furthest_ahead_then_the_lowest_id() {
        let leader = r(1, Some("a"), 100);
        let followers = [
            r(4, Some("b"), 90),
            r(2, Some("b"), 95),
            r(3, Some("b"), 95),
        ];
        assert_eq!(preferred_read_replica("b", &leader, &followers, 0), Some(2));
    }
}
