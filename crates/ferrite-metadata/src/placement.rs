//! Rack-aware replica placement (seed 004, and Kafka's `AdminUtils` for the first n
//! partitions): brokers are ordered alternating between racks, the leader of partition p
//! is `list[(start + p) % n]` and replica j is `list[(start + p + j) % n]`.
//!
//! When racks are uneven that plain walk can put two replicas in one rack while another
//! rack has none; like Kafka's rack-aware assignment we then skip ahead to a broker in an
//! uncovered rack. With balanced racks the skip never triggers, so the seed's table is
//! reproduced exactly.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSlot {
    pub node_id: i32,
    pub rack: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error(
        "replication factor {replication_factor} is larger than the {brokers} available brokers"
    )]
    ReplicationFactorTooLarge {
        replication_factor: i32,
        brokers: usize,
    },
    #[error("replication factor must be at least 1, got {0}")]
    ReplicationFactorTooSmall(i32),
    #[error("number of partitions must be at least 1, got {0}")]
    NoPartitions(i32),
}

/// Orders brokers alternating between racks: rack names sorted, brokers in each rack
/// sorted by id, then one from each rack in turn (0,3,1,4,2,5 for the seed's racks).
/// Brokers without a rack form their own group, so that a rackless cluster is just
/// sorted by id.
pub fn rack_alternating_order(brokers: &[BrokerSlot]) -> Vec<BrokerSlot> {
    let mut by_rack: BTreeMap<Option<&str>, Vec<&BrokerSlot>> = BTreeMap::new();
    for b in brokers {
        by_rack.entry(b.rack.as_deref()).or_default().push(b);
    }
    for list in by_rack.values_mut() {
        list.sort_by_key(|b| b.node_id);
    }
    let longest = by_rack.values().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::with_capacity(brokers.len());
    for i in 0..longest {
        for list in by_rack.values() {
            if let Some(b) = list.get(i) {
                out.push((*b).clone());
            }
        }
    }
    out
}

/// Replica lists for partitions `first_partition .. first_partition + partitions`; the
/// first replica of each list is the preferred leader.
pub fn assign_replicas(
    brokers: &[BrokerSlot],
    first_partition: i32,
    partitions: i32,
    replication_factor: i32,
    start_index: usize,
) -> Result<Vec<Vec<i32>>, PlacementError> {
    if partitions < 1 {
        return Err(PlacementError::NoPartitions(partitions));
    }
    if replication_factor < 1 {
        return Err(PlacementError::ReplicationFactorTooSmall(
            replication_factor,
        ));
    }
    let rf = replication_factor as usize;
    if rf > brokers.len() {
        return Err(PlacementError::ReplicationFactorTooLarge {
            replication_factor,
            brokers: brokers.len(),
        });
    }
    let list = rack_alternating_order(brokers);
    let n = list.len();
    let rack_count = list
        .iter()
        .map(|b| b.rack.as_deref())
        .collect::<BTreeSet<_>>()
        .len();
    let mut out = Vec::with_capacity(partitions as usize);
    for p in first_partition..first_partition + partitions {
        let mut chosen: Vec<&BrokerSlot> = Vec::with_capacity(rf);
        for j in 0..rf {
            let k = (start_index + p as usize + j) % n;
            let covered: BTreeSet<Option<&str>> =
                chosen.iter().map(|b| b.rack.as_deref()).collect();
            let need_new_rack = covered.len() < rack_count;
            let pick = (0..n)
                .filter_map(|m| list.get((k + m) % n))
                .filter(|b| !chosen.iter().any(|c| c.node_id == b.node_id))
                .find(|b| !need_new_rack || !covered.contains(&b.rack.as_deref()))
                .or_else(|| {
                    (0..n)
                        .filter_map(|m| list.get((k + m) % n))
                        .find(|b| !chosen.iter().any(|c| c.node_id == b.node_id))
                });
            // rf <= n guarantees an unchosen broker exists.
            if let Some(b) = pick {
                chosen.push(b);
            }
        }
        assert_eq!(chosen.len(), rf);
        out.push(chosen.iter().map(|b| b.node_id).collect());
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seed_cluster() -> Vec<BrokerSlot> {
        (0..6)
            .map(|id| BrokerSlot {
                node_id: id,
                rack: Some(if id < 3 { "rack1" } else { "rack2" }.into()),
            })
            .collect()
    }

    #[test]
    fn reproduces_seed_004_table_exactly() {
        let order: Vec<i32> = rack_alternating_order(&seed_cluster())
            .iter()
            .map(|b| b.node_id)
            .collect();
        assert_eq!(order, vec![0, 3, 1, 4, 2, 5]);
        let got = assign_replicas(&seed_cluster(), 0, 10, 3, 0).unwrap();
        // (leader, first follower, second follower) per partition, from seed 004.
        let expected = vec![
            vec![0, 3, 1],
            vec![3, 1, 4],
            vec![1, 4, 2],
            vec![4, 2, 5],
            vec![2, 5, 0],
            vec![5, 0, 3],
            vec![0, 3, 1],
            vec![3, 1, 4],
            vec![1, 4, 2],
            vec![4, 2, 5],
        ];
        assert_eq!(got, expected);
        let mut counts = [0; 6];
        for r in &got {
            for b in r {
                counts[*b as usize] += 1;
            }
        }
        // The seed's table (authoritative) gives 4,6,5,5,6,4; its prose summary is wrong.
        assert_eq!(counts, [4, 6, 5, 5, 6, 4]);
        // Partition 4 spans both racks: leader 2 (rack1), followers 5 (rack2) and 0 (rack1).
        assert_eq!(got[4], vec![2, 5, 0]);
    }

    #[test]
    fn brokers_without_rack_are_ordered_by_id() {
        let brokers: Vec<_> = [2, 0, 1]
            .iter()
            .map(|&id| BrokerSlot {
                node_id: id,
                rack: None,
            })
            .collect();
        let got = assign_replicas(&brokers, 0, 4, 2, 1).unwrap();
        assert_eq!(got, vec![vec![1, 2], vec![2, 0], vec![0, 1], vec![1, 2]]);
    }

    #[test]
    fn single_node_rejects_rf_above_one() {
        let one = vec![BrokerSlot {
            node_id: 0,
            rack: None,
        }];
        assert_eq!(
            assign_replicas(&one, 0, 3, 1, 0).unwrap(),
            vec![vec![0], vec![0], vec![0]]
        );
        assert!(matches!(
            assign_replicas(&one, 0, 1, 3, 0),
            Err(PlacementError::ReplicationFactorTooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn replicas_distinct_and_span_racks(
            racks in proptest::collection::vec(0u8..4, 1..10),
            partitions in 1i32..40,
            rf_seed in 1usize..10,
            start in 0usize..20,
        ) {
            let brokers: Vec<BrokerSlot> = racks.iter().enumerate()
                .map(|(i, r)| BrokerSlot { node_id: i as i32 * 7 + 1, rack: Some(format!("r{r}")) })
                .collect();
            let rf = 1 + rf_seed % brokers.len();
            let got = assign_replicas(&brokers, 0, partitions, rf as i32, start).unwrap();
            let rack_of = |id: i32| brokers.iter().find(|b| b.node_id == id).unwrap().rack.clone();
            let rack_count = brokers.iter().map(|b| b.rack.clone()).collect::<BTreeSet<_>>().len();
            prop_assert_eq!(got.len(), partitions as usize);
            for replicas in got {
                let distinct: BTreeSet<_> = replicas.iter().collect();
                prop_assert_eq!(distinct.len(), rf);
                let spanned: BTreeSet<_> = replicas.iter().map(|&id| rack_of(id)).collect();
                prop_assert_eq!(spanned.len(), rf.min(rack_count));
            }
        }
    }
}
