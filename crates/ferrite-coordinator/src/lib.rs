//! The consumer group coordinator (Kafka's classic group protocol) as a sans-I/O state
//! machine: requests and clock ticks in, responses and records out. Time (`now_ms`) is an
//! argument everywhere; member ids come from a counter and a prefix given at
//! construction, so a test replays exactly.
//!
//! Long-polling requests (JoinGroup, SyncGroup) carry a caller-chosen [`Token`]; when the
//! rebalance completes the coordinator emits [`Effect::JoinDone`]/[`Effect::SyncDone`] for
//! that token. Records ([`Effect::Persist`]) must be written to `__consumer_offsets`
//! before any effect that follows them is delivered.
//!
//! Committed offsets flow one way: `commit_offsets` validates and returns records, the
//! caller appends them, then [`GroupCoordinator::replay`] applies them, the same code as
//! start-up loading. Group membership is live state: the machine changes it directly and
//! emits a group record at the end of each rebalance so that a restart can restore it.

pub mod codec;
pub mod records;
pub mod txn;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::{
    GroupId, JoinGroupRequest, JoinGroupResponse, SyncGroupRequest, SyncGroupResponse,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
pub use records::{GroupRecord, GroupValue, MemberValue, OffsetValue};

/// Identifies a pending JoinGroup or SyncGroup of the caller.
pub type Token = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// `group.min.session.timeout.ms`
    pub min_session_timeout_ms: i32,
    /// `group.max.session.timeout.ms`
    pub max_session_timeout_ms: i32,
    /// `group.initial.rebalance.delay.ms`: how long a new group waits for more members.
    pub initial_rebalance_delay_ms: i64,
    /// `group.max.size`
    pub group_members_max: usize,
    /// `offsets.retention.minutes`, in ms.
    pub offsets_retention_ms: i64,
    /// `offset.metadata.max.bytes`
    pub offset_metadata_bytes_max: usize,
    /// Largest subscription metadata accepted from one member.
    pub member_metadata_bytes_max: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            min_session_timeout_ms: 6_000,
            max_session_timeout_ms: 1_800_000,
            initial_rebalance_delay_ms: 3_000,
            group_members_max: 1_000,
            offsets_retention_ms: 7 * 24 * 60 * 60 * 1000,
            offset_metadata_bytes_max: 4096,
            member_metadata_bytes_max: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl GroupState {
    pub fn as_str(&self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
            GroupState::Dead => "Dead",
        }
    }
}

#[derive(Debug, Clone)]
struct Member {
    member_id: String,
    group_instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout_ms: i32,
    rebalance_timeout_ms: i32,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    last_heartbeat_ms: i64,
    awaiting_join: Option<Token>,
    awaiting_sync: Option<Token>,
    /// Joined (or re-joined) during the current rebalance.
    joined: bool,
    synced: bool,
}

impl Member {
    /// When the member expires unless it heartbeats (Kafka's heartbeat timer fires at
    /// exactly this time).
    fn session_deadline_ms(&self) -> i64 {
        self.last_heartbeat_ms + i64::from(self.session_timeout_ms)
    }

    fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub struct CommittedOffset {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: Option<String>,
    pub commit_timestamp_ms: i64,
}

#[derive(Debug)]
struct Group {
    id: String,
    state: GroupState,
    state_timestamp_ms: i64,
    protocol_type: Option<String>,
    protocol_name: Option<String>,
    generation_id: i32,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED (KIP-394), and when they expire.
    pending_members: BTreeMap<String, i64>,
    /// When the current rebalance phase gives up on members that have not joined/synced.
    rebalance_deadline_ms: i64,
    /// A new group waits this long for more members (group.initial.rebalance.delay.ms).
    initial_delay_until_ms: i64,
    offsets: BTreeMap<(String, i32), CommittedOffset>,
}

impl Group {
    fn new(id: &str, now: i64) -> Group {
        Group {
            id: id.to_string(),
            state: GroupState::Empty,
            state_timestamp_ms: now,
            protocol_type: None,
            protocol_name: None,
            generation_id: 0,
            leader: None,
            members: BTreeMap::new(),
            pending_members: BTreeMap::new(),
            rebalance_deadline_ms: 0,
            initial_delay_until_ms: 0,
            offsets: BTreeMap::new(),
        }
    }

    fn transition(&mut self, state: GroupState, now: i64) {
        self.state = state;
        self.state_timestamp_ms = now;
    }

    /// Kafka's `ClassicGroup.validateMember`: the instance id is checked before the member
    /// id, so that a static member replaced by a newer process (same `group.instance.id`,
    /// new member id) learns it is fenced (FENCED_INSTANCE_ID, fatal for the client)
    /// instead of UNKNOWN_MEMBER_ID, which would make it rejoin and take the identity
    /// back, flipping it between the two processes forever.
    fn validate_member(
        &self,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), ResponseError> {
        if let Some(instance) = instance_id {
            match self.static_member(instance) {
                None => return Err(ResponseError::UnknownMemberId),
                Some(m) if m.member_id != member_id => {
                    tracing::info!(
                        group = %self.id, member = member_id, instance,
                        current = %m.member_id, "static member is fenced by a newer one"
                    );
                    return Err(ResponseError::FencedInstanceId);
                }
                Some(_) => {}
            }
        }
        if self.members.contains_key(member_id) {
            Ok(())
        } else {
            Err(ResponseError::UnknownMemberId)
        }
    }

    fn static_member(&self, instance_id: &str) -> Option<&Member> {
        self.members
            .values()
            .find(|m| m.group_instance_id.as_deref() == Some(instance_id))
    }

    /// A protocol every member supports, chosen by vote: each member votes for its most
    /// preferred candidate (Kafka's rule).
    fn select_protocol(&self) -> Option<String> {
        let mut candidates: Option<BTreeSet<&str>> = None;
        for m in self.members.values() {
            let names: BTreeSet<&str> = m.protocols.iter().map(|(n, _)| n.as_str()).collect();
            candidates = Some(match candidates {
                None => names,
                Some(c) => c.intersection(&names).copied().collect(),
            });
        }
        let candidates = candidates?;
        let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
        for m in self.members.values() {
            if let Some((n, _)) = m
                .protocols
                .iter()
                .find(|(n, _)| candidates.contains(n.as_str()))
            {
                *votes.entry(n.as_str()).or_default() += 1;
            }
        }
        votes
            .into_iter()
            .max_by_key(|(_, v)| *v)
            .map(|(n, _)| n.to_string())
    }

    fn supports_protocols(&self, protocol_type: &str, protocols: &[(String, Bytes)]) -> bool {
        if self.members.is_empty() {
            return !protocol_type.is_empty() && !protocols.is_empty();
        }
        if self.protocol_type.as_deref() != Some(protocol_type) {
            return false;
        }
        // Some protocol must stay common to every member.
        let mut common: BTreeSet<&str> = protocols.iter().map(|(n, _)| n.as_str()).collect();
        for m in self.members.values() {
            let theirs: BTreeSet<&str> = m.protocols.iter().map(|(n, _)| n.as_str()).collect();
            common = common.intersection(&theirs).copied().collect();
        }
        !common.is_empty()
    }

    fn max_rebalance_timeout_ms(&self) -> i64 {
        self.members
            .values()
            .map(|m| i64::from(m.rebalance_timeout_ms))
            .max()
            .unwrap_or(0)
    }

    fn to_record(&self) -> GroupRecord {
        let protocol = self.protocol_name.clone().unwrap_or_default();
        GroupRecord::Group {
            group: self.id.clone(),
            value: Some(GroupValue {
                protocol_type: self.protocol_type.clone().unwrap_or_default(),
                generation_id: self.generation_id,
                protocol_name: self.protocol_name.clone(),
                leader: self.leader.clone(),
                state_timestamp_ms: self.state_timestamp_ms,
                members: self
                    .members
                    .values()
                    .map(|m| MemberValue {
                        member_id: m.member_id.clone(),
                        group_instance_id: m.group_instance_id.clone(),
                        client_id: m.client_id.clone(),
                        client_host: m.client_host.clone(),
                        session_timeout_ms: m.session_timeout_ms,
                        rebalance_timeout_ms: m.rebalance_timeout_ms,
                        subscription: m.metadata_for(&protocol).to_vec(),
                        assignment: m.assignment.to_vec(),
                    })
                    .collect(),
            }),
        }
    }
}

/// What the caller must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Append this record to the group's `__consumer_offsets` partition.
    Persist(GroupRecord),
    JoinDone(Token, JoinGroupResponse),
    SyncDone(Token, SyncGroupResponse),
}

/// The outcome of a JoinGroup or SyncGroup: answered now, or later through an effect.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply<T> {
    Now(T),
    Later,
}

/// Who sent a request (for DescribeGroups).
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub client_id: String,
    pub client_host: String,
}

pub struct GroupCoordinator {
    config: GroupConfig,
    groups: BTreeMap<String, Group>,
    member_id_prefix: String,
    member_id_counter: u64,
}

/// Kafka's `ClassicGroup.validateOffsetCommit`, for OffsetCommit (`transactional` false)
/// and TxnOffsetCommit (true; Ferrite does not serve TxnOffsetCommit yet, the rule is here
/// so that it follows Kafka's when it does):
/// - a Dead group: COORDINATOR_NOT_AVAILABLE;
/// - generation < 0 on an Empty group: accepted (admin tools, `assign()` consumers);
/// - with a generation, member id or instance id: the member must be valid (instance id
///   first, FENCED_INSTANCE_ID for a replaced static member) and the generation current
///   (ILLEGAL_GENERATION); without them, a non-empty group refuses a plain commit
///   (UNKNOWN_MEMBER_ID), a transactional one is accepted;
/// - CompletingRebalance refuses a plain commit with REBALANCE_IN_PROGRESS. Nothing else
///   does: in PreparingRebalance a member of the current generation commits (clients do
///   exactly that in their revocation callback, before rejoining), and Kafka accepts it.
fn validate_offset_commit(
    group: &Group,
    member_id: &str,
    instance_id: Option<&str>,
    generation_id: i32,
    transactional: bool,
) -> Result<(), ResponseError> {
    if group.state == GroupState::Dead {
        return Err(ResponseError::CoordinatorNotAvailable);
    }
    if generation_id < 0 && group.state == GroupState::Empty {
        return Ok(());
    }
    if generation_id >= 0 || !member_id.is_empty() || instance_id.is_some() {
        group.validate_member(member_id, instance_id)?;
        if generation_id != group.generation_id {
            return Err(ResponseError::IllegalGeneration);
        }
    } else if !transactional && group.state != GroupState::Empty {
        return Err(ResponseError::UnknownMemberId);
    }
    if !transactional && group.state == GroupState::CompletingRebalance {
        return Err(ResponseError::RebalanceInProgress);
    }
    Ok(())
}

/// The TxnOffsetCommit rule (see [`validate_offset_commit`]); exposed for the day the
/// broker serves TxnOffsetCommit, and tested.
pub fn validate_txn_offset_commit_state(
    coordinator: &GroupCoordinator,
    group_id: &str,
    member_id: &str,
    instance_id: Option<&str>,
    generation_id: i32,
) -> Result<(), i16> {
    match coordinator.groups.get(group_id) {
        None if generation_id < 0 => Ok(()),
        None => Err(ResponseError::IllegalGeneration.code()),
        Some(g) => validate_offset_commit(g, member_id, instance_id, generation_id, true)
            .map_err(|e| e.code()),
    }
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn join_error(code: ResponseError, member_id: &str) -> JoinGroupResponse {
    JoinGroupResponse::default()
        .with_error_code(code.code())
        .with_generation_id(-1)
        .with_member_id(s(member_id))
        .with_leader(s(""))
}

fn sync_error(code: ResponseError) -> SyncGroupResponse {
    SyncGroupResponse::default().with_error_code(code.code())
}

/// The `__consumer_offsets` partition that holds `group` and whose leader is its
/// coordinator: Kafka's `Utils.abs(groupId.hashCode()) % partitions`, with Java's UTF-16
/// string hash (`abs(i32::MIN)` is 0, as Kafka's `Utils.abs`).
pub fn partition_for_group(group: &str, partitions: i32) -> i32 {
    java_hash_partition(group, partitions)
}

/// `Utils.abs(key.hashCode()) % partitions` with Java's UTF-16 string hash: how Kafka
/// maps a group id or a transactional id to its coordinator's partition.
pub(crate) fn java_hash_partition(key: &str, partitions: i32) -> i32 {
    let mut h: i32 = 0;
    for unit in key.encode_utf16() {
        h = h.wrapping_mul(31).wrapping_add(i32::from(unit));
    }
    let abs = if h == i32::MIN { 0 } else { h.abs() };
    abs % partitions.max(1)
}

impl GroupCoordinator {
    /// `member_id_prefix` makes member ids unique across broker restarts (the broker
    /// passes something random; tests pass a constant).
    pub fn new(config: GroupConfig, member_id_prefix: String) -> Self {
        GroupCoordinator {
            config,
            groups: BTreeMap::new(),
            member_id_prefix,
            member_id_counter: 0,
        }
    }

    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    fn new_member_id(&mut self, client_id: &str) -> String {
        self.member_id_counter += 1;
        format!(
            "{client_id}-{}-{}",
            self.member_id_prefix, self.member_id_counter
        )
    }

    // ---- JoinGroup ----------------------------------------------------------------

    pub fn join(
        &mut self,
        now: i64,
        token: Token,
        version: i16,
        client: &ClientInfo,
        req: &JoinGroupRequest,
    ) -> (Reply<JoinGroupResponse>, Vec<Effect>) {
        let group_id = req.group_id.0.as_str();
        let member_id = req.member_id.as_str();
        let protocols: Vec<(String, Bytes)> = req
            .protocols
            .iter()
            .map(|p| (p.name.to_string(), p.metadata.clone()))
            .collect();
        let protocol_type = req.protocol_type.to_string();
        let instance_id = req.group_instance_id.as_ref().map(|i| i.to_string());
        if group_id.is_empty() {
            return (
                Reply::Now(join_error(ResponseError::InvalidGroupId, member_id)),
                vec![],
            );
        }
        if req.session_timeout_ms < self.config.min_session_timeout_ms
            || req.session_timeout_ms > self.config.max_session_timeout_ms
        {
            return (
                Reply::Now(join_error(ResponseError::InvalidSessionTimeout, member_id)),
                vec![],
            );
        }
        if protocols.iter().map(|(_, m)| m.len()).sum::<usize>()
            > self.config.member_metadata_bytes_max
        {
            // Kafka has no dedicated code; an oversized group record would fail to be written.
            return (
                Reply::Now(join_error(ResponseError::InvalidRequest, member_id)),
                vec![],
            );
        }
        let group = self
            .groups
            .entry(group_id.to_string())
            .or_insert_with(|| Group::new(group_id, now));
        if group.state == GroupState::Dead {
            return (
                Reply::Now(join_error(
                    ResponseError::CoordinatorNotAvailable,
                    member_id,
                )),
                vec![],
            );
        }
        if !group.supports_protocols(&protocol_type, &protocols) {
            return (
                Reply::Now(join_error(
                    ResponseError::InconsistentGroupProtocol,
                    member_id,
                )),
                vec![],
            );
        }
        let rebalance_timeout_ms = if version == 0 {
            req.session_timeout_ms
        } else {
            req.rebalance_timeout_ms
        };

        if member_id.is_empty() {
            // A static member coming back (KIP-345): same instance id, new member id.
            if let Some(instance) = &instance_id {
                if let Some(old) = group.static_member(instance).map(|m| m.member_id.clone()) {
                    let new_id = format!("{instance}-{}-{}", self.member_id_prefix, {
                        self.member_id_counter += 1;
                        self.member_id_counter
                    });
                    let group = self.groups.get_mut(group_id).expect_group();
                    return Self::rejoin_static(
                        group,
                        now,
                        token,
                        version,
                        &self.config,
                        &old,
                        new_id,
                        client,
                        req,
                        protocols,
                        rebalance_timeout_ms,
                    );
                }
            }
            if group.members.len() + group.pending_members.len() >= self.config.group_members_max {
                return (
                    Reply::Now(join_error(ResponseError::GroupMaxSizeReached, member_id)),
                    vec![],
                );
            }
            let new_id = match &instance_id {
                Some(i) => {
                    self.member_id_counter += 1;
                    format!("{i}-{}-{}", self.member_id_prefix, self.member_id_counter)
                }
                None => self.new_member_id(&client.client_id),
            };
            let group = self.groups.get_mut(group_id).expect_group();
            // KIP-394: v4+ dynamic members first get an id, then join with it.
            if version >= 4 && instance_id.is_none() {
                group
                    .pending_members
                    .insert(new_id.clone(), now + i64::from(req.session_timeout_ms));
                return (
                    Reply::Now(join_error(ResponseError::MemberIdRequired, &new_id)),
                    vec![],
                );
            }
            return Self::add_member_and_rebalance(
                group,
                now,
                token,
                new_id,
                client,
                req,
                protocol_type,
                protocols,
                rebalance_timeout_ms,
                &self.config,
            );
        }

        let group = self.groups.get_mut(group_id).expect_group();
        if group.pending_members.remove(member_id).is_some() {
            return Self::add_member_and_rebalance(
                group,
                now,
                token,
                member_id.to_string(),
                client,
                req,
                protocol_type,
                protocols,
                rebalance_timeout_ms,
                &self.config,
            );
        }
        if let Err(code) = group.validate_member(member_id, instance_id.as_deref()) {
            return (Reply::Now(join_error(code, member_id)), vec![]);
        }
        let Some(member) = group.members.get(member_id) else {
            return (
                Reply::Now(join_error(ResponseError::UnknownMemberId, member_id)),
                vec![],
            );
        };
        let unchanged = member.protocols == protocols;
        let is_leader = group.leader.as_deref() == Some(member_id);
        match group.state {
            GroupState::PreparingRebalance => {
                Self::update_member(
                    group,
                    now,
                    member_id,
                    token,
                    req,
                    protocols,
                    rebalance_timeout_ms,
                );
                let effects = Self::maybe_complete_join(group, now);
                (Reply::Later, effects)
            }
            GroupState::CompletingRebalance | GroupState::Stable
                if unchanged && !(is_leader && group.state == GroupState::Stable) =>
            {
                // Same metadata: answer with the current generation (a lost response).
                let m = group.members.get_mut(member_id).expect_member();
                m.last_heartbeat_ms = now;
                (Reply::Now(Self::join_response(group, member_id)), vec![])
            }
            _ => {
                Self::update_member(
                    group,
                    now,
                    member_id,
                    token,
                    req,
                    protocols,
                    rebalance_timeout_ms,
                );
                let effects = Self::rebalance(group, now, &self.config);
                (Reply::Later, effects)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn rejoin_static(
        group: &mut Group,
        now: i64,
        token: Token,
        version: i16,
        config: &GroupConfig,
        old_id: &str,
        new_id: String,
        client: &ClientInfo,
        req: &JoinGroupRequest,
        protocols: Vec<(String, Bytes)>,
        rebalance_timeout_ms: i32,
    ) -> (Reply<JoinGroupResponse>, Vec<Effect>) {
        let Some(mut member) = group.members.remove(old_id) else {
            return (
                Reply::Now(join_error(ResponseError::UnknownMemberId, "")),
                vec![],
            );
        };
        let unchanged = member.protocols == protocols;
        // The old process is fenced: anything it still has in flight fails.
        let mut effects = Vec::new();
        if let Some(t) = member.awaiting_join.take() {
            effects.push(Effect::JoinDone(
                t,
                join_error(ResponseError::FencedInstanceId, old_id),
            ));
        }
        if let Some(t) = member.awaiting_sync.take() {
            effects.push(Effect::SyncDone(
                t,
                sync_error(ResponseError::FencedInstanceId),
            ));
        }
        member.member_id = new_id.clone();
        member.client_id = client.client_id.clone();
        member.client_host = client.client_host.clone();
        member.session_timeout_ms = req.session_timeout_ms;
        member.rebalance_timeout_ms = rebalance_timeout_ms;
        member.last_heartbeat_ms = now;
        if group.leader.as_deref() == Some(old_id) {
            group.leader = Some(new_id.clone());
        }
        if group.state == GroupState::Stable && unchanged {
            // KIP-345: no rebalance. The member gets the current generation back and its
            // SyncGroup returns the assignment it had.
            group.members.insert(new_id.clone(), member);
            effects.push(Effect::Persist(group.to_record()));
            let mut resp = Self::join_response(group, &new_id);
            if version >= 9 && group.leader.as_deref() == Some(new_id.as_str()) {
                // The leader must not reassign (KIP-814, v9+). Older clients run their
                // assignor anyway; SyncGroup on a stable group ignores the result and
                // returns the stored assignment.
                resp = resp.with_skip_assignment(true);
            }
            return (Reply::Now(resp), effects);
        }
        member.protocols = protocols;
        member.awaiting_join = Some(token);
        member.joined = true;
        group.members.insert(new_id, member);
        effects.extend(Self::rebalance(group, now, config));
        (Reply::Later, effects)
    }

    #[allow(clippy::too_many_arguments)]
    fn add_member_and_rebalance(
        group: &mut Group,
        now: i64,
        token: Token,
        member_id: String,
        client: &ClientInfo,
        req: &JoinGroupRequest,
        protocol_type: String,
        protocols: Vec<(String, Bytes)>,
        rebalance_timeout_ms: i32,
        config: &GroupConfig,
    ) -> (Reply<JoinGroupResponse>, Vec<Effect>) {
        if group.members.is_empty() {
            group.protocol_type = Some(protocol_type);
        }
        group.members.insert(
            member_id.clone(),
            Member {
                member_id: member_id.clone(),
                group_instance_id: req.group_instance_id.as_ref().map(|i| i.to_string()),
                client_id: client.client_id.clone(),
                client_host: client.client_host.clone(),
                session_timeout_ms: req.session_timeout_ms,
                rebalance_timeout_ms,
                protocols,
                assignment: Bytes::new(),
                last_heartbeat_ms: now,
                awaiting_join: Some(token),
                awaiting_sync: None,
                joined: true,
                synced: false,
            },
        );
        let effects = Self::rebalance(group, now, config);
        (Reply::Later, effects)
    }

    fn update_member(
        group: &mut Group,
        now: i64,
        member_id: &str,
        token: Token,
        req: &JoinGroupRequest,
        protocols: Vec<(String, Bytes)>,
        rebalance_timeout_ms: i32,
    ) {
        if let Some(m) = group.members.get_mut(member_id) {
            m.protocols = protocols;
            m.session_timeout_ms = req.session_timeout_ms;
            m.rebalance_timeout_ms = rebalance_timeout_ms;
            m.last_heartbeat_ms = now;
            m.awaiting_join = Some(token);
            m.joined = true;
        }
    }

    /// Moves the group to PreparingRebalance (if it is not there already). Members that
    /// were waiting for a sync are told to rejoin.
    fn prepare_rebalance(group: &mut Group, now: i64, config: &GroupConfig) -> Vec<Effect> {
        let mut effects = Vec::new();
        if group.state == GroupState::PreparingRebalance {
            return effects;
        }
        for m in group.members.values_mut() {
            if let Some(t) = m.awaiting_sync.take() {
                effects.push(Effect::SyncDone(
                    t,
                    sync_error(ResponseError::RebalanceInProgress),
                ));
            }
            if m.awaiting_join.is_none() {
                m.joined = false;
            }
            m.synced = false;
        }
        if group.state == GroupState::Empty {
            group.initial_delay_until_ms = now + config.initial_rebalance_delay_ms;
        }
        group.rebalance_deadline_ms = now + group.max_rebalance_timeout_ms();
        group.transition(GroupState::PreparingRebalance, now);
        effects
    }

    /// Starts (or continues) a rebalance and completes it at once if nobody is missing.
    fn rebalance(group: &mut Group, now: i64, config: &GroupConfig) -> Vec<Effect> {
        let mut effects = Self::prepare_rebalance(group, now, config);
        effects.extend(Self::maybe_complete_join(group, now));
        effects
    }

    /// Completes the join phase when every member has rejoined (or the deadline passed
    /// and the rest are dropped).
    fn maybe_complete_join(group: &mut Group, now: i64) -> Vec<Effect> {
        if group.state != GroupState::PreparingRebalance {
            return vec![];
        }
        let all_joined =
            group.members.values().all(|m| m.joined) && group.pending_members.is_empty();
        let deadline_passed = now >= group.rebalance_deadline_ms;
        if now < group.initial_delay_until_ms && !deadline_passed {
            return vec![];
        }
        if !all_joined && !deadline_passed {
            return vec![];
        }
        let mut effects = Vec::new();
        let dropped: Vec<String> = group
            .members
            .values()
            .filter(|m| !m.joined)
            .map(|m| m.member_id.clone())
            .collect();
        for id in dropped {
            tracing::info!(group = %group.id, member = %id, "member did not rejoin in time; removed");
            group.members.remove(&id);
        }
        group.pending_members.clear();
        group.generation_id += 1;
        if group.members.is_empty() {
            group.protocol_name = None;
            group.leader = None;
            group.transition(GroupState::Empty, now);
            effects.push(Effect::Persist(group.to_record()));
            return effects;
        }
        group.protocol_name = group.select_protocol();
        if group
            .leader
            .as_ref()
            .is_none_or(|l| !group.members.contains_key(l))
        {
            group.leader = group.members.keys().next().cloned();
        }
        group.transition(GroupState::CompletingRebalance, now);
        group.rebalance_deadline_ms = now + group.max_rebalance_timeout_ms();
        let ids: Vec<String> = group.members.keys().cloned().collect();
        for id in ids {
            let resp = Self::join_response(group, &id);
            if let Some(m) = group.members.get_mut(&id) {
                m.joined = false;
                m.last_heartbeat_ms = now;
                if let Some(t) = m.awaiting_join.take() {
                    effects.push(Effect::JoinDone(t, resp));
                }
            }
        }
        effects
    }

    fn join_response(group: &Group, member_id: &str) -> JoinGroupResponse {
        let protocol = group.protocol_name.clone().unwrap_or_default();
        let leader = group.leader.clone().unwrap_or_default();
        let members = if leader == member_id {
            group
                .members
                .values()
                .map(|m| {
                    JoinGroupResponseMember::default()
                        .with_member_id(s(&m.member_id))
                        .with_group_instance_id(m.group_instance_id.as_deref().map(s))
                        .with_metadata(m.metadata_for(&protocol))
                })
                .collect()
        } else {
            vec![]
        };
        JoinGroupResponse::default()
            .with_generation_id(group.generation_id)
            .with_protocol_type(group.protocol_type.as_deref().map(s))
            .with_protocol_name(group.protocol_name.as_deref().map(s))
            .with_leader(s(&leader))
            .with_member_id(s(member_id))
            .with_members(members)
    }

    // ---- SyncGroup ----------------------------------------------------------------

    pub fn sync(
        &mut self,
        now: i64,
        token: Token,
        req: &SyncGroupRequest,
    ) -> (Reply<SyncGroupResponse>, Vec<Effect>) {
        let member_id = req.member_id.as_str();
        let Some(group) = self.groups.get_mut(req.group_id.0.as_str()) else {
            return (
                Reply::Now(sync_error(ResponseError::UnknownMemberId)),
                vec![],
            );
        };
        if group.state == GroupState::Dead {
            return (
                Reply::Now(sync_error(ResponseError::CoordinatorNotAvailable)),
                vec![],
            );
        }
        if let Err(code) = group.validate_member(member_id, req.group_instance_id.as_deref()) {
            return (Reply::Now(sync_error(code)), vec![]);
        }
        if req.generation_id != group.generation_id {
            return (
                Reply::Now(sync_error(ResponseError::IllegalGeneration)),
                vec![],
            );
        }
        // v5+ checks the protocol type and name against the group's.
        let type_mismatch = req
            .protocol_type
            .as_ref()
            .is_some_and(|t| Some(t.as_str()) != group.protocol_type.as_deref());
        let name_mismatch = req
            .protocol_name
            .as_ref()
            .is_some_and(|n| Some(n.as_str()) != group.protocol_name.as_deref());
        if type_mismatch || name_mismatch {
            return (
                Reply::Now(sync_error(ResponseError::InconsistentGroupProtocol)),
                vec![],
            );
        }
        match group.state {
            GroupState::Empty | GroupState::Dead => (
                Reply::Now(sync_error(ResponseError::UnknownMemberId)),
                vec![],
            ),
            GroupState::PreparingRebalance => (
                Reply::Now(sync_error(ResponseError::RebalanceInProgress)),
                vec![],
            ),
            GroupState::Stable => {
                let m = group.members.get_mut(member_id).expect_member();
                m.last_heartbeat_ms = now;
                (Reply::Now(Self::sync_response(group, member_id)), vec![])
            }
            GroupState::CompletingRebalance => {
                let is_leader = group.leader.as_deref() == Some(member_id);
                let m = group.members.get_mut(member_id).expect_member();
                m.awaiting_sync = Some(token);
                m.synced = true;
                m.last_heartbeat_ms = now;
                if !is_leader {
                    return (Reply::Later, vec![]);
                }
                for m in group.members.values_mut() {
                    m.assignment = req
                        .assignments
                        .iter()
                        .find(|a| a.member_id.as_str() == m.member_id)
                        .map(|a| a.assignment.clone())
                        .unwrap_or_default();
                }
                group.transition(GroupState::Stable, now);
                let mut effects = vec![Effect::Persist(group.to_record())];
                let ids: Vec<String> = group.members.keys().cloned().collect();
                for id in ids {
                    let resp = Self::sync_response(group, &id);
                    if let Some(t) = group
                        .members
                        .get_mut(&id)
                        .and_then(|m| m.awaiting_sync.take())
                    {
                        effects.push(Effect::SyncDone(t, resp));
                    }
                }
                (Reply::Later, effects)
            }
        }
    }

    fn sync_response(group: &Group, member_id: &str) -> SyncGroupResponse {
        SyncGroupResponse::default()
            .with_protocol_type(group.protocol_type.as_deref().map(s))
            .with_protocol_name(group.protocol_name.as_deref().map(s))
            .with_assignment(
                group
                    .members
                    .get(member_id)
                    .map(|m| m.assignment.clone())
                    .unwrap_or_default(),
            )
    }

    // ---- Heartbeat, LeaveGroup ------------------------------------------------------

    pub fn heartbeat(
        &mut self,
        now: i64,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation_id: i32,
    ) -> i16 {
        let Some(group) = self.groups.get_mut(group_id) else {
            return ResponseError::UnknownMemberId.code();
        };
        let state = group.state;
        let generation = group.generation_id;
        // Kafka's order (GroupMetadataManager.validateClassicGroupHeartbeat): Dead, member
        // (instance id first), generation, then the state.
        if state == GroupState::Dead {
            return ResponseError::CoordinatorNotAvailable.code();
        }
        if let Err(code) = group.validate_member(member_id, instance_id) {
            return code.code();
        }
        if generation_id != generation {
            return ResponseError::IllegalGeneration.code();
        }
        let Some(m) = group.members.get_mut(member_id) else {
            return ResponseError::UnknownMemberId.code();
        };
        m.last_heartbeat_ms = now;
        match state {
            GroupState::Empty | GroupState::Dead => ResponseError::UnknownMemberId.code(),
            GroupState::PreparingRebalance => ResponseError::RebalanceInProgress.code(),
            GroupState::CompletingRebalance | GroupState::Stable => 0,
        }
    }

    /// Removes members (by member id, or by instance id for static members). Returns a
    /// code per member, in order.
    pub fn leave(
        &mut self,
        now: i64,
        group_id: &str,
        members: &[(String, Option<String>)],
    ) -> (Result<Vec<i16>, i16>, Vec<Effect>) {
        let Some(group) = self.groups.get_mut(group_id) else {
            return (Err(ResponseError::UnknownMemberId.code()), vec![]);
        };
        let mut codes = Vec::with_capacity(members.len());
        let mut removed_any = false;
        let mut effects = Vec::new();
        for (member_id, instance_id) in members {
            let target = match instance_id {
                Some(i) => match group.static_member(i) {
                    Some(m) if member_id.is_empty() || &m.member_id == member_id => {
                        Some(m.member_id.clone())
                    }
                    Some(_) => {
                        codes.push(ResponseError::FencedInstanceId.code());
                        continue;
                    }
                    None => None,
                },
                None => group
                    .members
                    .contains_key(member_id)
                    .then(|| member_id.clone()),
            };
            if group.pending_members.remove(member_id).is_some() {
                codes.push(0);
                continue;
            }
            match target.and_then(|id| group.members.remove(&id)) {
                Some(mut m) => {
                    if let Some(t) = m.awaiting_join.take() {
                        effects.push(Effect::JoinDone(
                            t,
                            join_error(ResponseError::UnknownMemberId, &m.member_id),
                        ));
                    }
                    if let Some(t) = m.awaiting_sync.take() {
                        effects.push(Effect::SyncDone(
                            t,
                            sync_error(ResponseError::UnknownMemberId),
                        ));
                    }
                    removed_any = true;
                    codes.push(0);
                }
                None => codes.push(ResponseError::UnknownMemberId.code()),
            }
        }
        if removed_any {
            effects.extend(Self::after_member_removed(group, now, &self.config));
        }
        (Ok(codes), effects)
    }

    fn after_member_removed(group: &mut Group, now: i64, config: &GroupConfig) -> Vec<Effect> {
        if group
            .leader
            .as_ref()
            .is_some_and(|l| !group.members.contains_key(l))
        {
            group.leader = None;
        }
        match group.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                if group.members.is_empty() {
                    group.generation_id += 1;
                    group.protocol_name = None;
                    group.transition(GroupState::Empty, now);
                    vec![Effect::Persist(group.to_record())]
                } else {
                    Self::rebalance(group, now, config)
                }
            }
            GroupState::PreparingRebalance => Self::maybe_complete_join(group, now),
            _ => vec![],
        }
    }

    /// The group's record could not be persisted (a full disk): as Kafka's coordinator
    /// does when storing a SyncGroup assignment fails, the assignment is dropped and the
    /// group goes back to PreparingRebalance. Its members hear the error, back off and
    /// rejoin, instead of running on an assignment that a restart would not know.
    pub fn persist_failed(&mut self, group_id: &str, now: i64) -> Vec<Effect> {
        let Some(group) = self.groups.get_mut(group_id) else {
            return Vec::new();
        };
        if !matches!(
            group.state,
            GroupState::Stable | GroupState::CompletingRebalance
        ) {
            return Vec::new();
        }
        for m in group.members.values_mut() {
            m.assignment = Bytes::new();
        }
        Self::prepare_rebalance(group, now, &self.config)
    }

    // ---- Time -----------------------------------------------------------------------

    /// The earliest time after `now` at which [`Self::tick`] has something to do for a
    /// member or a rebalance (a session or pending-member expiry, a rebalance deadline,
    /// the end of the initial delay), so that the caller can tick exactly then rather
    /// than on a coarse period. Offset expiry is not included: it is measured in minutes.
    pub fn next_deadline_ms(&self, now: i64) -> Option<i64> {
        let mut next: Option<i64> = None;
        let mut consider = |t: i64| {
            if t > now {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for group in self.groups.values() {
            for m in group.members.values() {
                if m.awaiting_join.is_none() && m.awaiting_sync.is_none() {
                    consider(m.session_deadline_ms());
                }
            }
            for expires in group.pending_members.values() {
                consider(*expires);
            }
            match group.state {
                GroupState::PreparingRebalance => {
                    consider(group.initial_delay_until_ms);
                    consider(group.rebalance_deadline_ms);
                }
                GroupState::CompletingRebalance => consider(group.rebalance_deadline_ms),
                _ => {}
            }
        }
        next
    }

    /// Session expiry, rebalance and sync timeouts, the initial rebalance delay, and
    /// expiry of offsets of empty groups.
    pub fn tick(&mut self, now: i64) -> Vec<Effect> {
        let mut effects = Vec::new();
        let config = self.config.clone();
        let mut dead = Vec::new();
        for group in self.groups.values_mut() {
            group.pending_members.retain(|_, expires| *expires > now);
            // Members in the join phase are waiting on us, not silent.
            let expired: Vec<String> = group
                .members
                .values()
                .filter(|m| m.awaiting_join.is_none() && m.awaiting_sync.is_none())
                .filter(|m| now >= m.session_deadline_ms())
                .map(|m| m.member_id.clone())
                .collect();
            for id in &expired {
                tracing::info!(group = %group.id, member = %id, "session timed out");
                group.members.remove(id);
            }
            if !expired.is_empty() {
                effects.extend(Self::after_member_removed(group, now, &config));
            }
            match group.state {
                GroupState::PreparingRebalance => {
                    effects.extend(Self::maybe_complete_join(group, now))
                }
                GroupState::CompletingRebalance if now >= group.rebalance_deadline_ms => {
                    // Members that never sent SyncGroup are dropped and the group rebalances.
                    let laggards: Vec<String> = group
                        .members
                        .values()
                        .filter(|m| !m.synced)
                        .map(|m| m.member_id.clone())
                        .collect();
                    for id in laggards {
                        group.members.remove(&id);
                    }
                    effects.extend(Self::after_member_removed(group, now, &config));
                    if group.state == GroupState::CompletingRebalance {
                        effects.extend(Self::prepare_rebalance(group, now, &config));
                    }
                }
                _ => {}
            }
            // KIP-211: offsets of an empty group expire `offsets.retention` after it
            // became empty (or after the commit, for groups that never had members).
            if group.state == GroupState::Empty {
                let since = group.state_timestamp_ms;
                let stale: Vec<(String, i32)> = group
                    .offsets
                    .iter()
                    .filter(|(_, o)| {
                        now - o.commit_timestamp_ms.max(since) > config.offsets_retention_ms
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for (topic, partition) in stale {
                    effects.push(Effect::Persist(GroupRecord::Offset {
                        group: group.id.clone(),
                        topic: topic.clone(),
                        partition,
                        value: None,
                    }));
                    group.offsets.remove(&(topic, partition));
                }
                if group.offsets.is_empty()
                    && group.members.is_empty()
                    && now - since > config.offsets_retention_ms
                {
                    dead.push(group.id.clone());
                }
            }
        }
        for id in dead {
            self.groups.remove(&id);
            effects.push(Effect::Persist(GroupRecord::Group {
                group: id,
                value: None,
            }));
        }
        effects
    }

    // ---- Offsets ----------------------------------------------------------------------

    /// Validates an OffsetCommit and returns the records to write; `Err` is a group-wide
    /// error code. `offsets` is `(topic, partition, offset, leader_epoch, metadata)`;
    /// per-partition problems (unknown partitions) are the caller's to filter first.
    /// `version` is the OffsetCommit request version.
    #[allow(clippy::too_many_arguments)]
    pub fn commit_offsets(
        &mut self,
        now: i64,
        version: i16,
        group_id: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation_id: i32,
        offsets: &[(String, i32, i64, i32, Option<String>)],
    ) -> Result<Vec<Result<GroupRecord, i16>>, i16> {
        if group_id.is_empty() {
            return Err(ResponseError::InvalidGroupId.code());
        }
        if !self.groups.contains_key(group_id) {
            if generation_id >= 0 {
                // Kafka's OffsetMetadataManager: v9+ says GROUP_ID_NOT_FOUND, older
                // versions ILLEGAL_GENERATION. Only a generation -1 commit (assign() users,
                // admin tools) creates a "simple" group.
                return Err(if version >= 9 {
                    ResponseError::GroupIdNotFound.code()
                } else {
                    ResponseError::IllegalGeneration.code()
                });
            }
            self.groups
                .insert(group_id.to_string(), Group::new(group_id, now));
        }
        let group = self.groups.get_mut(group_id).expect_group();
        validate_offset_commit(group, member_id, instance_id, generation_id, false)
            .map_err(|e| e.code())?;
        if let Some(m) = group.members.get_mut(member_id) {
            m.last_heartbeat_ms = now;
        }
        Ok(offsets
            .iter()
            .map(|(topic, partition, offset, leader_epoch, metadata)| {
                if metadata
                    .as_ref()
                    .is_some_and(|m| m.len() > self.config.offset_metadata_bytes_max)
                {
                    return Err(ResponseError::OffsetMetadataTooLarge.code());
                }
                Ok(GroupRecord::Offset {
                    group: group_id.to_string(),
                    topic: topic.clone(),
                    partition: *partition,
                    value: Some(OffsetValue {
                        offset: *offset,
                        leader_epoch: *leader_epoch,
                        // A null metadata is stored as "", as Kafka's OffsetAndMetadata
                        // does, so the state is the same before and after a reload.
                        metadata: Some(metadata.clone().unwrap_or_default()),
                        commit_timestamp_ms: now,
                    }),
                })
            })
            .collect())
    }

    /// Applies a record read back from `__consumer_offsets` (start-up) or just written.
    pub fn replay(&mut self, record: &GroupRecord, now: i64) {
        match record {
            GroupRecord::Offset {
                group,
                topic,
                partition,
                value,
            } => {
                let g = self
                    .groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(group, now));
                match value {
                    Some(v) => {
                        g.offsets.insert(
                            (topic.clone(), *partition),
                            CommittedOffset {
                                offset: v.offset,
                                leader_epoch: v.leader_epoch,
                                metadata: v.metadata.clone(),
                                commit_timestamp_ms: v.commit_timestamp_ms,
                            },
                        );
                    }
                    None => {
                        g.offsets.remove(&(topic.clone(), *partition));
                    }
                }
            }
            GroupRecord::Group { group, value: None } => {
                self.groups.remove(group);
            }
            GroupRecord::Group {
                group,
                value: Some(v),
            } => {
                let g = self
                    .groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(group, now));
                // Membership is live state; this only runs at load, to restore it.
                g.protocol_type = Some(v.protocol_type.clone()).filter(|t| !t.is_empty());
                g.protocol_name = v.protocol_name.clone();
                g.generation_id = v.generation_id;
                g.leader = v.leader.clone();
                g.members = v
                    .members
                    .iter()
                    .map(|m| {
                        let protocols = vec![(
                            v.protocol_name.clone().unwrap_or_default(),
                            Bytes::from(m.subscription.clone()),
                        )];
                        (
                            m.member_id.clone(),
                            Member {
                                member_id: m.member_id.clone(),
                                group_instance_id: m.group_instance_id.clone(),
                                client_id: m.client_id.clone(),
                                client_host: m.client_host.clone(),
                                session_timeout_ms: m.session_timeout_ms,
                                rebalance_timeout_ms: m.rebalance_timeout_ms,
                                protocols,
                                assignment: Bytes::from(m.assignment.clone()),
                                last_heartbeat_ms: now,
                                awaiting_join: None,
                                awaiting_sync: None,
                                joined: false,
                                synced: true,
                            },
                        )
                    })
                    .collect();
                let state = if g.members.is_empty() {
                    GroupState::Empty
                } else {
                    GroupState::Stable
                };
                g.state = state;
                g.state_timestamp_ms = if state == GroupState::Empty {
                    v.state_timestamp_ms
                } else {
                    now
                };
            }
        }
    }

    /// Forgets every group of `__consumer_offsets` partition `partition` (of
    /// `partitions`): this broker no longer leads it (Kafka's `removeGroupsForPartition`).
    /// Members waiting in JoinGroup or SyncGroup are answered NOT_COORDINATOR, so that
    /// they find the new coordinator and rejoin there. Returns those answers.
    pub fn unload_partition(&mut self, partition: i32, partitions: i32) -> Vec<Effect> {
        let gone: Vec<String> = self
            .groups
            .keys()
            .filter(|g| partition_for_group(g, partitions) == partition)
            .cloned()
            .collect();
        let mut effects = Vec::new();
        for id in gone {
            let Some(group) = self.groups.remove(&id) else {
                continue;
            };
            for m in group.members.values() {
                if let Some(t) = m.awaiting_join {
                    effects.push(Effect::JoinDone(
                        t,
                        join_error(ResponseError::NotCoordinator, &m.member_id),
                    ));
                }
                if let Some(t) = m.awaiting_sync {
                    effects.push(Effect::SyncDone(
                        t,
                        sync_error(ResponseError::NotCoordinator),
                    ));
                }
            }
        }
        effects
    }

    /// Whether any group of `__consumer_offsets` partition `partition` is held.
    pub fn holds_partition(&self, partition: i32, partitions: i32) -> bool {
        self.groups
            .keys()
            .any(|g| partition_for_group(g, partitions) == partition)
    }

    /// Records that rebuild the whole current state through [`Self::replay`]: every
    /// committed offset, and the group record of each group that has had a rebalance.
    /// Start-up uses it to rewrite a partition of `__consumer_offsets` in another format.
    pub fn state_records(&self) -> Vec<GroupRecord> {
        let mut out = Vec::new();
        for g in self.groups.values() {
            if g.generation_id > 0 || !g.members.is_empty() {
                out.push(g.to_record());
            }
            for ((topic, partition), o) in &g.offsets {
                out.push(GroupRecord::Offset {
                    group: g.id.clone(),
                    topic: topic.clone(),
                    partition: *partition,
                    value: Some(OffsetValue {
                        offset: o.offset,
                        leader_epoch: o.leader_epoch,
                        metadata: o.metadata.clone(),
                        commit_timestamp_ms: o.commit_timestamp_ms,
                    }),
                });
            }
        }
        out
    }

    pub fn committed(
        &self,
        group_id: &str,
        topic: &str,
        partition: i32,
    ) -> Option<&CommittedOffset> {
        self.groups
            .get(group_id)?
            .offsets
            .get(&(topic.to_string(), partition))
    }

    /// Every committed offset of a group: `((topic, partition), offset)`.
    pub fn all_committed(&self, group_id: &str) -> Vec<((String, i32), CommittedOffset)> {
        self.groups
            .get(group_id)
            .map(|g| {
                g.offsets
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Tombstones for an OffsetDelete; `Err` is a group-wide code. `subscribed` says
    /// whether the live group still consumes a topic (GROUP_SUBSCRIBED_TO_TOPIC).
    pub fn delete_offsets(
        &self,
        group_id: &str,
        partitions: &[(String, i32)],
        subscribed: impl Fn(&[Bytes], &str) -> bool,
    ) -> Result<Vec<Result<GroupRecord, i16>>, i16> {
        let Some(group) = self.groups.get(group_id) else {
            return Err(ResponseError::GroupIdNotFound.code());
        };
        let protocol = group.protocol_name.clone().unwrap_or_default();
        let subscriptions: Vec<Bytes> = group
            .members
            .values()
            .map(|m| m.metadata_for(&protocol))
            .collect();
        Ok(partitions
            .iter()
            .map(|(topic, partition)| {
                if group.state != GroupState::Empty && subscribed(&subscriptions, topic) {
                    return Err(ResponseError::GroupSubscribedToTopic.code());
                }
                Ok(GroupRecord::Offset {
                    group: group_id.to_string(),
                    topic: topic.clone(),
                    partition: *partition,
                    value: None,
                })
            })
            .collect())
    }

    /// Tombstones for DeleteGroups, after Kafka's checks.
    pub fn delete_group(&self, group_id: &str) -> Result<Vec<GroupRecord>, i16> {
        let Some(group) = self.groups.get(group_id) else {
            return Err(ResponseError::GroupIdNotFound.code());
        };
        if group.state != GroupState::Empty {
            return Err(ResponseError::NonEmptyGroup.code());
        }
        let mut records: Vec<GroupRecord> = group
            .offsets
            .keys()
            .map(|(t, p)| GroupRecord::Offset {
                group: group_id.to_string(),
                topic: t.clone(),
                partition: *p,
                value: None,
            })
            .collect();
        records.push(GroupRecord::Group {
            group: group_id.to_string(),
            value: None,
        });
        Ok(records)
    }

    // ---- Describe, List -----------------------------------------------------------------

    pub fn describe(&self, group_id: &str) -> DescribedGroup {
        let Some(g) = self.groups.get(group_id) else {
            return DescribedGroup::default()
                .with_group_id(GroupId(s(group_id)))
                .with_group_state(s(GroupState::Dead.as_str()))
                .with_authorized_operations(i32::MIN);
        };
        let protocol = g.protocol_name.clone().unwrap_or_default();
        let stable = g.state == GroupState::Stable;
        DescribedGroup::default()
            .with_group_id(GroupId(s(group_id)))
            .with_group_state(s(g.state.as_str()))
            .with_protocol_type(s(g.protocol_type.as_deref().unwrap_or("")))
            .with_protocol_data(s(if stable { &protocol } else { "" }))
            .with_authorized_operations(i32::MIN)
            .with_members(
                g.members
                    .values()
                    .map(|m| {
                        DescribedGroupMember::default()
                            .with_member_id(s(&m.member_id))
                            .with_group_instance_id(m.group_instance_id.as_deref().map(s))
                            .with_client_id(s(&m.client_id))
                            .with_client_host(s(&m.client_host))
                            .with_member_metadata(if stable {
                                m.metadata_for(&protocol)
                            } else {
                                Bytes::new()
                            })
                            .with_member_assignment(if stable {
                                m.assignment.clone()
                            } else {
                                Bytes::new()
                            })
                    })
                    .collect(),
            )
    }

    /// `(group id, protocol type, state)` of every group.
    pub fn list(&self) -> Vec<(String, String, GroupState)> {
        self.groups
            .values()
            .map(|g| {
                (
                    g.id.clone(),
                    g.protocol_type.clone().unwrap_or_default(),
                    g.state,
                )
            })
            .collect()
    }

    pub fn state(&self, group_id: &str) -> Option<GroupState> {
        self.groups.get(group_id).map(|g| g.state)
    }

    pub fn generation(&self, group_id: &str) -> Option<i32> {
        self.groups.get(group_id).map(|g| g.generation_id)
    }
}

/// Lookups right after an insert or a `contains_key` check. A miss is a bug in this
/// module, so it is an assertion, not an error path.
trait ExpectPresent<T> {
    fn expect_group(self) -> T;
    fn expect_member(self) -> T;
}
impl<T> ExpectPresent<T> for Option<T> {
    #[allow(clippy::expect_used)]
    fn expect_group(self) -> T {
        self.expect("group was just looked up or inserted")
    }
    #[allow(clippy::expect_used)]
    fn expect_member(self) -> T {
        self.expect("member was just looked up")
    }
}

#[cfg(test)]
mod tests;
