#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
//! State machine tests: no I/O, explicit time.

use super::*;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;

const SESSION: i32 = 10_000;

fn cfg() -> GroupConfig {
    GroupConfig {
        initial_rebalance_delay_ms: 0,
        ..GroupConfig::default()
    }
}

fn join_req(member: &str, instance: Option<&str>, meta: &'static [u8]) -> JoinGroupRequest {
    JoinGroupRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_session_timeout_ms(SESSION)
        .with_rebalance_timeout_ms(30_000)
        .with_member_id(s(member))
        .with_group_instance_id(instance.map(s))
        .with_protocol_type(s("consumer"))
        .with_protocols(vec![JoinGroupRequestProtocol::default()
            .with_name(s("range"))
            .with_metadata(Bytes::from_static(meta))])
}

fn client() -> ClientInfo {
    ClientInfo {
        client_id: "c".into(),
        client_host: "/127.0.0.1".into(),
    }
}

fn joins(effects: &[Effect]) -> Vec<(Token, JoinGroupResponse)> {
    effects
        .iter()
        .filter_map(|e| {
            if let Effect::JoinDone(t, r) = e {
                Some((*t, r.clone()))
            } else {
                None
            }
        })
        .collect()
}

fn syncs(effects: &[Effect]) -> Vec<(Token, SyncGroupResponse)> {
    effects
        .iter()
        .filter_map(|e| {
            if let Effect::SyncDone(t, r) = e {
                Some((*t, r.clone()))
            } else {
                None
            }
        })
        .collect()
}

/// Runs the KIP-394 two-step join for a dynamic member; returns the join effects.
fn join_dynamic(c: &mut GroupCoordinator, now: i64, token: Token) -> (String, Vec<Effect>) {
    let (r, _) = c.join(now, token, 5, &client(), &join_req("", None, b"m"));
    let Reply::Now(r) = r else {
        panic!("first join answers at once")
    };
    assert_eq!(r.error_code, ResponseError::MemberIdRequired.code());
    let id = r.member_id.to_string();
    let (r, effects) = c.join(now, token, 5, &client(), &join_req(&id, None, b"m"));
    assert_eq!(r, Reply::Later);
    (id, effects)
}

fn sync_req(
    member: &str,
    generation: i32,
    assignments: Vec<(&str, &'static [u8])>,
) -> SyncGroupRequest {
    SyncGroupRequest::default()
        .with_group_id(GroupId(s("g")))
        .with_member_id(s(member))
        .with_generation_id(generation)
        .with_assignments(
            assignments
                .into_iter()
                .map(|(m, a)| {
                    SyncGroupRequestAssignment::default()
                        .with_member_id(s(m))
                        .with_assignment(Bytes::from_static(a))
                })
                .collect(),
        )
}

#[test]
fn single_member_joins_syncs_and_is_stable() {
    let mut c = GroupCoordinator::new(cfg(), "p".into());
    let (id, effects) = join_dynamic(&mut c, 0, 1);
    let j = joins(&effects);
    assert_eq!(j.len(), 1);
    assert_eq!(j[0].1.generation_id, 1);
    assert_eq!(j[0].1.leader.as_str(), id);
    assert_eq!(j[0].1.members.len(), 1);
    assert_eq!(j[0].1.protocol_name.as_ref().unwrap().as_str(), "range");
    assert_eq!(c.state("g"), Some(GroupState::CompletingRebalance));
    let (r, effects) = c.sync(1, 2, &sync_req(&id, 1, vec![(&id, b"A")]));
    assert_eq!(r, Reply::Later);
    assert!(matches!(
        effects[0],
        Effect::Persist(GroupRecord::Group { .. })
    ));
    assert_eq!(syncs(&effects)[0].1.assignment.as_ref(), b"A");
    assert_eq!(c.state("g"), Some(GroupState::Stable));
    assert_eq!(c.heartbeat(2, "g", &id, None, 1), 0);
    assert_eq!(
        c.heartbeat(2, "g", &id, None, 0),
        ResponseError::IllegalGeneration.code()
    );
    assert_eq!(
        c.heartbeat(2, "g", "nobody", None, 1),
        ResponseError::UnknownMemberId.code()
    );
}

#[test]
fn second_member_triggers_rebalance_and_both_get_assignments() {
    let mut c = GroupCoordinator::new(cfg(), "p".into());
    let (a, _) = join_dynamic(&mut c, 0, 1);
    c.sync(0, 2, &sync_req(&a, 1, vec![(&a, b"all")]));
    let (b, effects) = join_dynamic(&mut c, 10, 3);
    assert!(
        joins(&effects).is_empty(),
        "waits for the existing member to rejoin"
    );
    assert_eq!(c.state("g"), Some(GroupState::PreparingRebalance));
    assert_eq!(
        c.heartbeat(11, "g", &a, None, 1),
        ResponseError::RebalanceInProgress.code()
    );
    let (_, effects) = c.join(12, 4, 5, &client(), &join_req(&a, None, b"m"));
    let j = joins(&effects);
    assert_eq!(j.len(), 2);
    assert!(j.iter().all(|(_, r)| r.generation_id == 2));
    let leader = j.iter().find(|(_, r)| !r.members.is_empty()).unwrap();
    assert_eq!(leader.1.members.len(), 2);
    let (r, _) = c.sync(13, 5, &sync_req(&b, 2, vec![]));
    assert_eq!(r, Reply::Later);
    let (_, effects) = c.sync(14, 6, &sync_req(&a, 2, vec![(&a, b"p0"), (&b, b"p1")]));
    let s = syncs(&effects);
    assert_eq!(s.len(), 2);
    assert_eq!(
        s.iter()
            .find(|(t, _)| *t == 5)
            .unwrap()
            .1
            .assignment
            .as_ref(),
        b"p1"
    );
    // A clean leave rebalances the rest.
    let (codes, _) = c.leave(20, "g", &[(b.clone(), None)]);
    assert_eq!(codes.unwrap(), vec![0]);
    assert_eq!(c.state("g"), Some(GroupState::PreparingRebalance));
    let (_, effects) = c.join(21, 7, 5, &client(), &join_req(&a, None, b"m"));
    assert_eq!(joins(&effects)[0].1.generation_id, 3);
}

#[test]
fn silent_member_expires_and_group_rebalances() {
    let mut c = GroupCoordinator::new(cfg(), "p".into());
    let (a, _) = join_dynamic(&mut c, 0, 1);
    c.sync(0, 2, &sync_req(&a, 1, vec![]));
    let (b, _) = join_dynamic(&mut c, 0, 3);
    let (_, e) = c.join(0, 4, 5, &client(), &join_req(&a, None, b"m"));
    assert_eq!(joins(&e).len(), 2);
    let leader = joins(&e)
        .into_iter()
        .find(|(_, r)| !r.members.is_empty())
        .unwrap()
        .1
        .member_id
        .to_string();
    let other = if leader == a { b.clone() } else { a.clone() };
    c.sync(1, 5, &sync_req(&other, 2, vec![]));
    c.sync(1, 6, &sync_req(&leader, 2, vec![]));
    assert_eq!(c.state("g"), Some(GroupState::Stable));
    // Only `a` keeps heartbeating.
    for t in (1_000..=12_000).step_by(1_000) {
        c.heartbeat(t, "g", &a, None, 2);
        c.tick(t);
    }
    assert_eq!(
        c.state("g"),
        Some(GroupState::PreparingRebalance),
        "b's session expired"
    );
    let (_, e) = c.join(12_500, 7, 5, &client(), &join_req(&a, None, b"m"));
    let j = joins(&e);
    assert_eq!(j.len(), 1);
    assert_eq!(j[0].1.members.len(), 1);
}

#[test]
fn static_member_restart_keeps_assignment_without_rebalance() {
    let mut c = GroupCoordinator::new(cfg(), "p".into());
    let (r, e) = c.join(0, 1, 5, &client(), &join_req("", Some("i1"), b"m"));
    assert_eq!(r, Reply::Later, "static members join directly");
    let first = joins(&e)[0].1.member_id.to_string();
    // A wrong instance id is fenced; none at all is accepted, as Kafka's validateMember
    // checks the instance id only when one is given.
    let (r, _) = c.sync(
        0,
        2,
        &sync_req(&first, 1, vec![(&first, b"mine")]).with_group_instance_id(Some(s("i2"))),
    );
    assert_eq!(r, Reply::Now(sync_error(ResponseError::UnknownMemberId)));
    c.sync(
        0,
        2,
        &sync_req(&first, 1, vec![(&first, b"mine")]).with_group_instance_id(Some(s("i1"))),
    );
    assert_eq!(c.state("g"), Some(GroupState::Stable));
    // Restart: empty member id, same instance id, same metadata.
    let (r, e) = c.join(5_000, 3, 5, &client(), &join_req("", Some("i1"), b"m"));
    let Reply::Now(r) = r else {
        panic!("no rebalance for a static rejoin")
    };
    assert_eq!(r.generation_id, 1);
    assert_ne!(r.member_id.as_str(), first);
    assert!(e.iter().any(|x| matches!(x, Effect::Persist(_))));
    assert_eq!(c.state("g"), Some(GroupState::Stable));
    let (r, _) = c.sync(
        5_001,
        4,
        &sync_req(r.member_id.as_str(), 1, vec![]).with_group_instance_id(Some(s("i1"))),
    );
    let Reply::Now(r) = r else { panic!() };
    assert_eq!(r.assignment.as_ref(), b"mine");
    // The old incarnation is fenced.
    assert_eq!(
        c.heartbeat(5_002, "g", &first, Some("i1"), 1),
        ResponseError::FencedInstanceId.code()
    );
}

#[test]
fn join_validation_errors() {
    let mut c = GroupCoordinator::new(cfg(), "p".into());
    let bad_timeout = join_req("", None, b"m").with_session_timeout_ms(10);
    let (r, _) = c.join(0, 1, 5, &client(), &bad_timeout);
    assert_eq!(
        r,
        Reply::Now(join_error(ResponseError::InvalidSessionTimeout, ""))
    );
    let no_protocols = join_req("", None, b"m").with_protocols(vec![]);
    let (r, _) = c.join(0, 1, 5, &client(), &no_protocols);
    assert_eq!(
        r,
        Reply::Now(join_error(ResponseError::InconsistentGroupProtocol, ""))
    );
    let (r, _) = c.join(0, 1, 5, &client(), &join_req("ghost", None, b"m"));
    assert_eq!(
        r,
        Reply::Now(join_error(ResponseError::UnknownMemberId, "ghost"))
    );
}

#[test]
fn offsets_commit_replay_and_delete() {
    let mut c = GroupCoordinator::new(cfg(), "p".into());
    let records = c
        .commit_offsets(
            5,
            8,
            "g",
            "",
            None,
            -1,
            &[("t".into(), 0, 42, -1, Some("meta".into()))],
        )
        .unwrap();
    let record = records[0].clone().unwrap();
    c.replay(&record, 5);
    let got = c.committed("g", "t", 0).unwrap();
    assert_eq!((got.offset, got.metadata.as_deref()), (42, Some("meta")));
    // Same records into a fresh coordinator (a restart) give the same state.
    let mut fresh = GroupCoordinator::new(cfg(), "q".into());
    let (k, v) = record.encode();
    fresh.replay(&GroupRecord::decode(&k, v.as_deref()).unwrap(), 6);
    assert_eq!(fresh.committed("g", "t", 0).unwrap().offset, 42);
    // A member-less commit while the group has members is refused.
    let (_id, _) = join_dynamic(&mut c, 10, 1);
    assert_eq!(
        c.commit_offsets(11, 8, "g", "", None, -1, &[]).unwrap_err(),
        ResponseError::UnknownMemberId.code()
    );
    assert_eq!(
        c.delete_group("g").unwrap_err(),
        ResponseError::NonEmptyGroup.code()
    );
    assert_eq!(
        c.delete_group("nope").unwrap_err(),
        ResponseError::GroupIdNotFound.code()
    );
}

#[test]
fn offsets_of_empty_groups_expire() {
    let mut c = GroupCoordinator::new(
        GroupConfig {
            offsets_retention_ms: 1_000,
            ..cfg()
        },
        "p".into(),
    );
    for r in c
        .commit_offsets(0, 8, "g", "", None, -1, &[("t".into(), 0, 1, -1, None)])
        .unwrap()
    {
        c.replay(&r.unwrap(), 0);
    }
    assert!(c.tick(500).is_empty());
    let effects = c.tick(2_000);
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::Persist(GroupRecord::Offset { value: None, .. }))));
    assert!(c.committed("g", "t", 0).is_none());
}

/// Kafka's ClassicGroup.validateOffsetCommit: a member of the current generation commits
/// while the group is PreparingRebalance (the revocation callback's commit, right before
/// it rejoins); only CompletingRebalance answers REBALANCE_IN_PROGRESS.
#[test]
fn offset_commit_follows_kafkas_state_rules() {
    let mut c = GroupCoordinator::new(cfg(), "p".into());
    let (a, effects) = join_dynamic(&mut c, 0, 1);
    let generation = joins(&effects)[0].1.generation_id;
    let offsets = [("t".to_string(), 0, 7, -1, None)];
    // CompletingRebalance: refused.
    assert_eq!(c.state("g"), Some(GroupState::CompletingRebalance));
    assert_eq!(
        c.commit_offsets(1, 8, "g", &a, None, generation, &offsets)
            .unwrap_err(),
        ResponseError::RebalanceInProgress.code()
    );
    c.sync(1, 2, &sync_req(&a, generation, vec![(&a, b"A")]));
    assert_eq!(c.state("g"), Some(GroupState::Stable));
    assert!(c
        .commit_offsets(2, 8, "g", &a, None, generation, &offsets)
        .is_ok());
    // A second member starts a rebalance: PreparingRebalance while `a` has not rejoined.
    let (r, _) = c.join(3, 3, 5, &client(), &join_req("", None, b"m"));
    let Reply::Now(r) = r else { panic!() };
    let b = r.member_id.to_string();
    c.join(3, 3, 5, &client(), &join_req(&b, None, b"m"));
    assert_eq!(c.state("g"), Some(GroupState::PreparingRebalance));
    let records = c
        .commit_offsets(4, 8, "g", &a, None, generation, &offsets)
        .expect("a current-generation member commits during PreparingRebalance");
    assert_eq!(records.len(), 1);
    assert!(records[0].is_ok());
    // ...but not with an old generation, nor as a stranger.
    assert_eq!(
        c.commit_offsets(4, 8, "g", &a, None, generation - 1, &offsets)
            .unwrap_err(),
        ResponseError::IllegalGeneration.code()
    );
    assert_eq!(
        c.commit_offsets(4, 8, "g", "ghost", None, generation, &offsets)
            .unwrap_err(),
        ResponseError::UnknownMemberId.code()
    );
    // Unknown group with a generation: ILLEGAL_GENERATION before v9, GROUP_ID_NOT_FOUND from v9.
    assert_eq!(
        c.commit_offsets(4, 8, "nope", "x", None, 1, &offsets)
            .unwrap_err(),
        ResponseError::IllegalGeneration.code()
    );
    assert_eq!(
        c.commit_offsets(4, 9, "nope", "x", None, 1, &offsets)
            .unwrap_err(),
        ResponseError::GroupIdNotFound.code()
    );
    assert_eq!(c.state("nope"), None, "a refused commit creates no group");
    // TxnOffsetCommit: not refused in CompletingRebalance, and member-less on a live group.
    assert_eq!(
        validate_txn_offset_commit_state(&c, "g", "", None, -1),
        Ok(())
    );
    assert_eq!(
        validate_txn_offset_commit_state(&c, "nope", "x", None, 3),
        Err(ResponseError::IllegalGeneration.code())
    );
}

/// Two processes with one group.instance.id: the newer one takes the identity, the older
/// one is fenced on every group API (FENCED_INSTANCE_ID, checked before the member id).
#[test]
fn replaced_static_member_is_fenced_everywhere() {
    let mut c = GroupCoordinator::new(cfg(), "p".into());
    let (r, effects) = c.join(0, 1, 5, &client(), &join_req("", Some("i1"), b"m"));
    assert_eq!(r, Reply::Later);
    let old = joins(&effects)[0].1.member_id.to_string();
    let generation = joins(&effects)[0].1.generation_id;
    c.sync(1, 2, &sync_req(&old, generation, vec![(&old, b"A")]));
    assert_eq!(c.state("g"), Some(GroupState::Stable));
    // The second process joins with the same instance id and no member id.
    let (r, _) = c.join(2, 3, 5, &client(), &join_req("", Some("i1"), b"m"));
    let Reply::Now(r) = r else { panic!() };
    assert_eq!(r.error_code, 0);
    let new = r.member_id.to_string();
    assert_ne!(new, old);
    let fenced = ResponseError::FencedInstanceId.code();
    assert_eq!(c.heartbeat(3, "g", &old, Some("i1"), generation), fenced);
    let (r, _) = c.sync(
        3,
        4,
        &sync_req(&old, generation, vec![]).with_group_instance_id(Some(s("i1"))),
    );
    assert_eq!(r, Reply::Now(sync_error(ResponseError::FencedInstanceId)));
    assert_eq!(
        c.commit_offsets(
            3,
            8,
            "g",
            &old,
            Some("i1"),
            generation,
            &[("t".into(), 0, 1, -1, None)]
        )
        .unwrap_err(),
        fenced
    );
    let (r, _) = c.join(3, 5, 5, &client(), &join_req(&old, Some("i1"), b"m"));
    assert_eq!(
        r,
        Reply::Now(join_error(ResponseError::FencedInstanceId, &old))
    );
    // The new member is unaffected.
    assert_eq!(c.heartbeat(3, "g", &new, Some("i1"), generation), 0);
    // An instance id nobody holds is UNKNOWN_MEMBER_ID.
    assert_eq!(
        c.heartbeat(3, "g", &new, Some("other"), generation),
        ResponseError::UnknownMemberId.code()
    );
}

/// A member expires at exactly `last heartbeat + session.timeout.ms`, and the coordinator
/// says when that is, so the caller ticks then (not on its next period).
#[test]
fn sessions_expire_at_their_deadline() {
    let mut c = GroupCoordinator::new(cfg(), "p".into());
    let (a, effects) = join_dynamic(&mut c, 0, 1);
    let generation = joins(&effects)[0].1.generation_id;
    c.sync(1, 2, &sync_req(&a, generation, vec![(&a, b"A")]));
    assert_eq!(c.heartbeat(1_000, "g", &a, None, generation), 0);
    let deadline = 1_000 + i64::from(SESSION);
    assert_eq!(c.next_deadline_ms(1_000), Some(deadline));
    assert!(c.tick(deadline - 1).is_empty());
    assert_eq!(c.state("g"), Some(GroupState::Stable));
    let effects = c.tick(deadline);
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::Persist(GroupRecord::Group { .. }))));
    assert_eq!(c.state("g"), Some(GroupState::Empty));
    assert_eq!(c.next_deadline_ms(deadline), None);
}

#[test]
fn a_group_record_that_cannot_be_persisted_sends_the_group_back_to_rebalance() {
    let mut c = GroupCoordinator::new(cfg(), "p".into());
    let (id, _) = join_dynamic(&mut c, 0, 1);
    let (_, effects) = c.sync(1, 2, &sync_req(&id, 1, vec![(&id, b"A")]));
    assert!(matches!(
        effects[0],
        Effect::Persist(GroupRecord::Group { .. })
    ));
    assert_eq!(c.state("g"), Some(GroupState::Stable));
    // The append of that record failed (disk full).
    c.persist_failed("g", 2);
    assert_eq!(c.state("g"), Some(GroupState::PreparingRebalance));
    // The member's heartbeat tells it to rejoin; the rejoin completes a new generation.
    assert_eq!(
        c.heartbeat(3, "g", &id, None, 1),
        ResponseError::RebalanceInProgress.code()
    );
    let (r, effects) = c.join(4, 3, 5, &client(), &join_req(&id, None, b"m"));
    assert_eq!(r, Reply::Later);
    let j = joins(&effects);
    assert_eq!(j.len(), 1);
    assert_eq!(j[0].1.generation_id, 2);
    assert!(c.persist_failed("unknown", 5).is_empty());
}

#[test]
fn java_hash_partitioning() {
    // "".hashCode() == 0; "a".hashCode() == 97; "ab" == 3105.
    assert_eq!(partition_for_group("", 50), 0);
    assert_eq!(partition_for_group("a", 50), 97 % 50);
    assert_eq!(partition_for_group("ab", 50), 3105 % 50);
    // "polygenelubricants".hashCode() == i32::MIN, which Kafka's abs maps to 0.
    assert_eq!(partition_for_group("polygenelubricants", 50), 0);
}

#[test]
fn unloading_a_partition_drops_its_groups_and_answers_waiters_not_coordinator() {
    let mut c = GroupCoordinator::new(cfg(), "p".into());
    // "g" is in partition javaHash("g") % 3 = 103 % 3 = 1; "a" in 97 % 3 = 1; "b" in 98 % 3 = 2.
    let partitions = 3;
    assert_eq!(partition_for_group("g", partitions), 1);
    for (group, offset) in [("b", 5), ("g", 42)] {
        let records = c
            .commit_offsets(
                1,
                8,
                group,
                "",
                None,
                -1,
                &[("t".into(), 0, offset, -1, None)],
            )
            .unwrap_or_else(|e| panic!("commit to {group}: {e}"));
        c.replay(&records[0].clone().unwrap(), 1);
    }
    // A member-less commit first: a group with members refuses it.
    // The first member's join completes at once; a second one's waits for the first to
    // rejoin.
    let (_first, _) = join_dynamic(&mut c, 2, 6);
    let (member, _) = join_dynamic(&mut c, 3, 7);
    assert!(c.holds_partition(1, partitions));
    assert!(c.holds_partition(2, partitions));
    assert!(c.unload_partition(0, partitions).is_empty());
    let effects = c.unload_partition(1, partitions);
    // The member still waiting in JoinGroup (the initial rebalance delay) hears
    // NOT_COORDINATOR.
    let j = joins(&effects);
    assert_eq!(j.len(), 1, "{effects:?}");
    assert_eq!(
        (j[0].0, j[0].1.error_code),
        (7, ResponseError::NotCoordinator.code())
    );
    assert_eq!(j[0].1.member_id.as_str(), member);
    assert!(!c.holds_partition(1, partitions));
    assert!(c.committed("g", "t", 0).is_none());
    assert_eq!(c.state("g"), None);
    // The other partition's group is untouched.
    assert_eq!(c.committed("b", "t", 0).map(|o| o.offset), Some(5));
}
