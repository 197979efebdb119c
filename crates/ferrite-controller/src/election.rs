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
/// shutdown, unregistration); `target_isr` replaces the ISR (AlterPartition);
/// `target_replicas` replaces the replica set (a reassignment started, changed or
/// cancelled; KIP-455).
#[derive(Debug, Clone)]
pub struct ChangeRequest {
    pub remove: Option<i32>,
    pub target_isr: Option<Vec<i32>>,
    pub target_replicas: Option<ReplicaSet>,
    pub election: Election,
}

/// A partition's replicas with the reassignment in progress, as KRaft's
/// `PartitionRegistration` holds them: during a reassignment `replicas` is the target
/// followed by the replicas being removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSet {
    pub replicas: Vec<i32>,
    pub adding: Vec<i32>,
    pub removing: Vec<i32>,
}

impl ReplicaSet {
    pub fn of(p: &PartitionImage) -> ReplicaSet {
        ReplicaSet {
            replicas: p.replicas.clone(),
            adding: p.adding_replicas.clone(),
            removing: p.removing_replicas.clone(),
        }
    }

    /// Kafka's `PartitionReassignmentReplicas`: moving from the `current` replicas to
    /// `target` adds the target's new ones and removes the current ones not in it; the
    /// replicas meanwhile are the target followed by those being removed. Unlike
    /// Kafka, a target replica still being added by a reassignment in progress stays
    /// added: sending the same plan twice, or a plan that keeps such a replica, does not
    /// complete the move before that replica is in sync.
    pub fn reassigning(current: &ReplicaSet, target: &[i32]) -> ReplicaSet {
        let removing: Vec<i32> = current
            .replicas
            .iter()
            .copied()
            .filter(|r| !target.contains(r))
            .collect();
        let adding: Vec<i32> = target
            .iter()
            .copied()
            .filter(|r| !current.replicas.contains(r) || current.adding.contains(r))
            .collect();
        let mut replicas = target.to_vec();
        replicas.extend(&removing);
        ReplicaSet {
            replicas,
            adding,
            removing,
        }
    }

    /// Kafka's `maybeCompleteReassignment`: once every added replica is in `isr`, the
    /// reassignment completes: the removed replicas leave the replicas and the ISR. Not
    /// while that would leave no ISR member that may lead (`may_lead`), so that
    /// completing never takes a partition offline.
    fn completed(
        &self,
        isr: &[i32],
        may_lead: impl Fn(i32) -> bool,
    ) -> Option<(ReplicaSet, Vec<i32>)> {
        if self.adding.is_empty() && self.removing.is_empty() {
            return None;
        }
        if !self.adding.iter().all(|r| isr.contains(r)) {
            return None;
        }
        let new_isr: Vec<i32> = isr
            .iter()
            .copied()
            .filter(|r| !self.removing.contains(r))
            .collect();
        let replicas: Vec<i32> = self
            .replicas
            .iter()
            .copied()
            .filter(|r| !self.removing.contains(r))
            .collect();
        if replicas.is_empty() || !new_isr.iter().any(|&r| may_lead(r)) {
            return None;
        }
        Some((
            ReplicaSet {
                replicas,
                adding: Vec::new(),
                removing: Vec::new(),
            },
            new_isr,
        ))
    }
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
    let mut assignment = change
        .target_replicas
        .clone()
        .unwrap_or_else(|| ReplicaSet::of(p));
    // Every change may complete a reassignment in progress, as Kafka's
    // `PartitionChangeBuilder` tries: typically the AlterPartition that brings the last
    // added replica into the ISR.
    if let Some((completed, isr)) = assignment.completed(&target, acceptable) {
        assignment = completed;
        target = isr;
    }
    let replicas = &assignment.replicas;
    let valid = |b: i32| target.contains(&b) && acceptable(b);
    let preferred = match change.election {
        Election::Preferred => replicas.first().copied().filter(|&b| valid(b)),
        Election::Online | Election::Unclean => None,
    };
    let (leader, isr) = if let Some(b) = preferred {
        (b, target)
    } else if p.leader >= 0 && valid(p.leader) {
        (p.leader, target)
    } else if let Some(b) = replicas.iter().copied().find(|&b| valid(b)) {
        (b, target)
    } else if let (Election::Unclean, Some(b)) = (
        change.election,
        replicas.iter().copied().find(|&b| acceptable(b)),
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
    let replicas_field = (assignment.replicas != p.replicas).then(|| assignment.replicas.clone());
    let adding_field = (assignment.adding != p.adding_replicas).then(|| assignment.adding.clone());
    let removing_field =
        (assignment.removing != p.removing_replicas).then(|| assignment.removing.clone());
    if leader_field == NO_LEADER_CHANGE
        && isr_field.is_none()
        && replicas_field.is_none()
        && adding_field.is_none()
        && removing_field.is_none()
    {
        return None;
    }
    Some(MetadataRecord::PartitionChange {
        topic_id,
        partition: p.partition,
        leader: leader_field,
        isr: isr_field,
        replicas: replicas_field,
        adding_replicas: adding_field,
        removing_replicas: removing_field,
    })
}
