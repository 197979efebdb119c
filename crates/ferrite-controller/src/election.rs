//! Leader election and ISR changes for one partition (Kafka's `PartitionChangeBuilder`):
//! given the partition, a target ISR and which brokers may lead, the one
//! `PartitionChange` record that gets there, or none when nothing changes.

use ferrite_metadata::{
    MetadataImage, MetadataRecord, PartitionImage, NO_LEADER, NO_LEADER_CHANGE,
};
use uuid::Uuid;

/// How a leader may be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Election {
    /// Keep a valid leader; else the first replica (Replicas order) in the ISR that may
    /// lead; else none.
    Online,
    /// As `Online`, but the preferred replica (the first in Replicas) first.
    Preferred,
    /// As `Online`, then, if no ISR member may lead, the first replica that may lead
    /// even though it is out of sync, with the ISR reset to it alone.
    Unclean,
}

/// The change to compute: `remove` leaves the ISR and may not lead (fencing, controlled
/// shutdown, unregistration); `target_isr` replaces the ISR (AlterPartition).
#[derive(Debug, Clone)]
pub struct ChangeRequest {
    pub remove: Option<i32>,
    pub target_isr: Option<Vec<i32>>,
    pub election: Election,
}

/// True if `broker` may lead or join an ISR now: registered, unfenced, not shutting
/// down, and not the broker being removed.
pub fn is_acceptable(image: &MetadataImage, broker: i32, remove: Option<i32>) -> bool {
    Some(broker) != remove && image.broker(broker).is_some_and(|b| b.is_active())
}

/// The record moving `p` (of topic `topic_id`) to what `change` asks for, or `None` when
/// the leader and the ISR would stay as they are.
pub fn partition_change(
    image: &MetadataImage,
    topic_id: Uuid,
    p: &PartitionImage,
    change: &ChangeRequest,
) -> Option<MetadataRecord> {
    let mut target: Vec<i32> = change.target_isr.clone().unwrap_or_else(|| p.isr.clone());
    if let Some(r) = change.remove {
        target.retain(|&b| b != r);
    }
    if target.is_empty() {
        // The ISR never empties: its last member stays (without leading, if it may not),
        // so that the partition knows which replica has every acknowledged record.
        target = p.isr.clone();
    }
    let acceptable = |b: i32| is_acceptable(image, b, change.remove);
    let valid = |b: i32| target.contains(&b) && acceptable(b);
    let preferred = match change.election {
        Election::Preferred => p.replicas.first().copied().filter(|&b| valid(b)),
        Election::Online | Election::Unclean => None,
    };
    let (leader, isr) = if let Some(b) = preferred {
        (b, target)
    } else if p.leader >= 0 && valid(p.leader) {
        (p.leader, target)
    } else if let Some(b) = p.replicas.iter().copied().find(|&b| valid(b)) {
        (b, target)
    } else if let (Election::Unclean, Some(b)) = (
        change.election,
        p.replicas.iter().copied().find(|&b| acceptable(b)),
    ) {
        // Unclean: an out-of-sync replica leads, and the ISR restarts from it.
        (b, vec![b])
    } else {
        (NO_LEADER, target)
    };
    let leader_field = if leader != p.leader {
        leader
    } else {
        NO_LEADER_CHANGE
    };
    let isr_field = (isr != p.isr).then_some(isr);
    if leader_field == NO_LEADER_CHANGE && isr_field.is_none() {
        return None;
    }
    Some(MetadataRecord::PartitionChange {
        topic_id,
        partition: p.partition,
        leader: leader_field,
        isr: isr_field,
    })
}
