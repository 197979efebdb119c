//! The controller's operating errors. Each variant is one Kafka error code
//! ([`ControllerError::code`]); the broker turns them into responses in its one error
//! mapping (`ferrite-broker/src/error.rs`). The message goes to the client as the
//! error message.

/// A request the controller refused. The Kafka error code of each variant:
///
/// | variant | Kafka error | code |
/// |---|---|---|
/// | `UnknownTopicOrPartition` | UNKNOWN_TOPIC_OR_PARTITION | 3 |
/// | `InvalidTopic` | INVALID_TOPIC_EXCEPTION | 17 |
/// | `TopicAlreadyExists` | TOPIC_ALREADY_EXISTS | 36 |
/// | `InvalidPartitions` | INVALID_PARTITIONS | 37 |
/// | `InvalidReplicationFactor` | INVALID_REPLICATION_FACTOR | 38 |
/// | `InvalidReplicaAssignment` | INVALID_REPLICA_ASSIGNMENT | 39 |
/// | `NotController` | NOT_CONTROLLER | 41 |
/// | `InvalidRequest` | INVALID_REQUEST | 42 |
/// | `FencedLeaderEpoch` | FENCED_LEADER_EPOCH | 74 |
/// | `StaleBrokerEpoch` | STALE_BROKER_EPOCH | 77 |
/// | `PreferredLeaderNotAvailable` | PREFERRED_LEADER_NOT_AVAILABLE | 80 |
/// | `EligibleLeadersNotAvailable` | ELIGIBLE_LEADERS_NOT_AVAILABLE | 83 |
/// | `ElectionNotNeeded` | ELECTION_NOT_NEEDED | 84 |
/// | `NoReassignmentInProgress` | NO_REASSIGNMENT_IN_PROGRESS | 85 |
/// | `InvalidUpdateVersion` | INVALID_UPDATE_VERSION | 95 |
/// | `UnknownTopicId` | UNKNOWN_TOPIC_ID | 100 |
/// | `DuplicateBrokerRegistration` | DUPLICATE_BROKER_REGISTRATION | 101 |
/// | `BrokerIdNotRegistered` | BROKER_ID_NOT_REGISTERED | 102 |
/// | `InconsistentClusterId` | INCONSISTENT_CLUSTER_ID | 104 |
/// | `IneligibleReplica` | INELIGIBLE_REPLICA | 107 |
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    #[error("{0}")]
    UnknownTopicOrPartition(String),
    #[error("{0}")]
    InvalidTopic(String),
    #[error("{0}")]
    TopicAlreadyExists(String),
    #[error("{0}")]
    InvalidPartitions(String),
    #[error("{0}")]
    InvalidReplicationFactor(String),
    #[error("{0}")]
    InvalidReplicaAssignment(String),
    /// This controller is not (or no longer) the active one, or the sender knows newer
    /// state than it does (a leader or partition epoch above its own).
    #[error("{0}")]
    NotController(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    FencedLeaderEpoch(String),
    #[error("{0}")]
    StaleBrokerEpoch(String),
    #[error("{0}")]
    PreferredLeaderNotAvailable(String),
    #[error("{0}")]
    EligibleLeadersNotAvailable(String),
    #[error("{0}")]
    ElectionNotNeeded(String),
    #[error("{0}")]
    NoReassignmentInProgress(String),
    #[error("{0}")]
    InvalidUpdateVersion(String),
    #[error("{0}")]
    UnknownTopicId(String),
    #[error("{0}")]
    DuplicateBrokerRegistration(String),
    #[error("{0}")]
    BrokerIdNotRegistered(String),
    #[error("{0}")]
    InconsistentClusterId(String),
    #[error("{0}")]
    IneligibleReplica(String),
}

impl ControllerError {
    /// Kafka's error code for this error (the table above).
    pub fn code(&self) -> i16 {
        match self {
            ControllerError::UnknownTopicOrPartition(_) => 3,
            ControllerError::InvalidTopic(_) => 17,
            ControllerError::TopicAlreadyExists(_) => 36,
            ControllerError::InvalidPartitions(_) => 37,
            ControllerError::InvalidReplicationFactor(_) => 38,
            ControllerError::InvalidReplicaAssignment(_) => 39,
            ControllerError::NotController(_) => 41,
            ControllerError::InvalidRequest(_) => 42,
            ControllerError::FencedLeaderEpoch(_) => 74,
            ControllerError::StaleBrokerEpoch(_) => 77,
            ControllerError::PreferredLeaderNotAvailable(_) => 80,
            ControllerError::EligibleLeadersNotAvailable(_) => 83,
            ControllerError::ElectionNotNeeded(_) => 84,
            ControllerError::NoReassignmentInProgress(_) => 85,
            ControllerError::InvalidUpdateVersion(_) => 95,
            ControllerError::UnknownTopicId(_) => 100,
            ControllerError::DuplicateBrokerRegistration(_) => 101,
            ControllerError::BrokerIdNotRegistered(_) => 102,
            ControllerError::InconsistentClusterId(_) => 104,
            ControllerError::IneligibleReplica(_) => 107,
        }
    }

    pub fn message(&self) -> String {
        self.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::ControllerError as E;
    use kafka_protocol::ResponseError as K;

    #[test]
    fn codes_are_kafkas() {
        let m = String::new;
        let cases = [
            (E::UnknownTopicOrPartition(m()), K::UnknownTopicOrPartition),
            (E::InvalidTopic(m()), K::InvalidTopicException),
            (E::TopicAlreadyExists(m()), K::TopicAlreadyExists),
            (E::InvalidPartitions(m()), K::InvalidPartitions),
            (
                E::InvalidReplicationFactor(m()),
                K::InvalidReplicationFactor,
            ),
            (
                E::InvalidReplicaAssignment(m()),
                K::InvalidReplicaAssignment,
            ),
            (E::NotController(m()), K::NotController),
            (E::InvalidRequest(m()), K::InvalidRequest),
            (E::FencedLeaderEpoch(m()), K::FencedLeaderEpoch),
            (E::StaleBrokerEpoch(m()), K::StaleBrokerEpoch),
            (
                E::PreferredLeaderNotAvailable(m()),
                K::PreferredLeaderNotAvailable,
            ),
            (
                E::EligibleLeadersNotAvailable(m()),
                K::EligibleLeadersNotAvailable,
            ),
            (E::ElectionNotNeeded(m()), K::ElectionNotNeeded),
            (
                E::NoReassignmentInProgress(m()),
                K::NoReassignmentInProgress,
            ),
            (E::InvalidUpdateVersion(m()), K::InvalidUpdateVersion),
            (E::UnknownTopicId(m()), K::UnknownTopicId),
            (
                E::DuplicateBrokerRegistration(m()),
                K::DuplicateBrokerRegistration,
            ),
            (E::BrokerIdNotRegistered(m()), K::BrokerIdNotRegistered),
            (E::InconsistentClusterId(m()), K::InconsistentClusterId),
            (E::IneligibleReplica(m()), K::IneligibleReplica),
        ];
        for (ours, kafka) in cases {
            assert_eq!(ours.code(), kafka.code(), "{ours:?}");
        }
    }
}
