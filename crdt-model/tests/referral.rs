//! The referral's typed operations, its authority rules, and the concurrency rule.

mod common;

use common::*;
use estuary_crdt_model::*;

fn sender() -> Editor {
    editor("chc-jianshe", 2_000)
}

fn receiver() -> Editor {
    editor("xinhua", 2_000)
}

fn schedule() -> ReferralOp {
    ReferralOp::Schedule {
        appointment: Timestamp(1_800_000_000_000),
        minutes: Some(30),
    }
}

/// A replica of `referral` written by another node.
fn replica(referral: &mut Referral, n: u8) -> Referral {
    Referral::load(&referral.save(), &actor(n)).unwrap()
}

fn sync(a: &mut Referral, b: &mut Referral) {
    a.merge(b).unwrap();
    b.merge(a).unwrap();
    assert_eq!(a.view(), b.view());
}

#[test]
fn create_starts_requested() {
    let referral = new_referral(1);
    let view = referral.view();
    assert_eq!(view.status, ReferralStatus::Requested);
    assert_eq!(view.from, institution("chc-jianshe"));
    assert_eq!(view.to, institution("xinhua"));
    assert_eq!(view.urgency.value, Urgency::Priority);
    assert!(view.history.is_empty());
}

#[test]
fn a_referral_to_oneself_is_refused() {
    let error = Referral::create(
        &actor(1),
        &sender(),
        &NewReferral {
            patient: doc_id(1),
            direction: Direction::Up,
            to: institution("chc-jianshe"),
            reason: "x".into(),
            urgency: Urgency::Routine,
            handover: String::new(),
        },
    )
    .unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::InvalidValue { field: "to", .. })
    ));
}

#[test]
fn full_life_cycle() {
    let mut referral = new_referral(1);
    for (op, status) in [
        (ReferralOp::Accept, ReferralStatus::Accepted),
        (schedule(), ReferralStatus::Scheduled),
        (ReferralOp::MarkArrived, ReferralStatus::Arrived),
        (ReferralOp::Complete, ReferralStatus::Completed),
    ] {
        referral.apply(&receiver(), &op).unwrap();
        assert_eq!(referral.view().status, status);
        validate(referral.automerge()).unwrap();
    }
    let view = referral.view();
    assert_eq!(view.appointment, Some(Timestamp(1_800_000_000_000)));
    assert_eq!(view.effective.len(), 4);
    assert!(view.superseded().is_empty());
}

#[test]
fn decline_is_final() {
    let mut referral = new_referral(1);
    referral
        .apply(
            &receiver(),
            &ReferralOp::Decline {
                reason: "no bed".into(),
            },
        )
        .unwrap();
    assert_eq!(referral.view().status, ReferralStatus::Declined);
    let error = referral
        .apply(&receiver(), &ReferralOp::Accept)
        .unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::IllegalTransition {
            from: ReferralStatus::Declined,
            to: ReferralStatus::Accepted
        })
    ));
}

#[test]
fn only_the_receiver_moves_the_referral_forward() {
    let mut referral = new_referral(1);
    for op in [
        ReferralOp::Accept,
        ReferralOp::Decline {
            reason: "no bed".into(),
        },
        schedule(),
        ReferralOp::MarkArrived,
        ReferralOp::Complete,
    ] {
        let error = referral.apply(&sender(), &op).unwrap_err();
        assert!(
            matches!(
                error,
                OpError::Invalid(ValidationError::NotAuthorised {
                    required: Role::Receiver,
                    ..
                })
            ),
            "{op:?}"
        );
    }
    let third_party = editor("dh-chongming-2", 2_000);
    assert!(referral.apply(&third_party, &ReferralOp::Accept).is_err());
    assert!(referral.apply(&third_party, &ReferralOp::Cancel).is_err());
}

#[test]
fn only_the_sender_cancels_and_only_before_arrival() {
    let mut referral = new_referral(1);
    let error = referral
        .apply(&receiver(), &ReferralOp::Cancel)
        .unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::NotAuthorised {
            required: Role::Sender,
            ..
        })
    ));
    referral.apply(&receiver(), &ReferralOp::Accept).unwrap();
    referral.apply(&receiver(), &schedule()).unwrap();
    referral
        .apply(&receiver(), &ReferralOp::MarkArrived)
        .unwrap();
    let error = referral.apply(&sender(), &ReferralOp::Cancel).unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::IllegalTransition { .. })
    ));
}

#[test]
fn sender_edits_handover_and_urgency() {
    let mut referral = new_referral(1);
    referral
        .apply(
            &sender(),
            &ReferralOp::EditHandover {
                handover: "troponin pending".into(),
            },
        )
        .unwrap();
    referral
        .apply(
            &sender(),
            &ReferralOp::SetUrgency {
                urgency: Urgency::Routine,
            },
        )
        .unwrap();
    let view = referral.view();
    assert_eq!(view.handover.value, "troponin pending");
    assert_eq!(view.urgency.value, Urgency::Routine);
    assert!(
        referral
            .apply(
                &receiver(),
                &ReferralOp::SetUrgency {
                    urgency: Urgency::Priority
                }
            )
            .is_err()
    );
}

#[test]
fn cancel_beats_a_concurrent_schedule() {
    let mut a = new_referral(1);
    a.apply(&receiver(), &ReferralOp::Accept).unwrap();
    let mut b = replica(&mut a, 2);
    a.apply(&sender(), &ReferralOp::Cancel).unwrap();
    b.apply(&receiver(), &schedule()).unwrap();
    sync(&mut a, &mut b);
    let view = a.view();
    assert_eq!(view.status, ReferralStatus::Cancelled);
    assert_eq!(view.superseded().len(), 1);
    assert_eq!(view.superseded()[0].to, ReferralStatus::Scheduled);
    // The appointment lost with the schedule: nobody is expected any more.
    assert_eq!(view.appointment, None);
}

#[test]
fn cancel_beats_a_concurrent_accept() {
    let mut a = new_referral(1);
    let mut b = replica(&mut a, 2);
    a.apply(&sender(), &ReferralOp::Cancel).unwrap();
    b.apply(&receiver(), &ReferralOp::Accept).unwrap();
    sync(&mut a, &mut b);
    assert_eq!(a.view().status, ReferralStatus::Cancelled);
}

#[test]
fn nothing_overrides_an_arrival() {
    let mut a = new_referral(1);
    a.apply(&receiver(), &ReferralOp::Accept).unwrap();
    a.apply(&receiver(), &schedule()).unwrap();
    let mut b = replica(&mut a, 2);
    a.apply(&sender(), &ReferralOp::Cancel).unwrap();
    b.apply(&receiver(), &ReferralOp::MarkArrived).unwrap();
    sync(&mut a, &mut b);
    assert_eq!(a.view().status, ReferralStatus::Arrived);
    // Care goes on from the arrival.
    a.apply(&receiver(), &ReferralOp::Complete).unwrap();
    assert_eq!(a.view().status, ReferralStatus::Completed);
}

#[test]
fn accept_beats_a_concurrent_decline() {
    let mut a = new_referral(1);
    let mut b = replica(&mut a, 2);
    a.apply(
        &receiver(),
        &ReferralOp::Decline {
            reason: "no bed".into(),
        },
    )
    .unwrap();
    b.apply(&receiver(), &ReferralOp::Accept).unwrap();
    sync(&mut a, &mut b);
    assert_eq!(a.view().status, ReferralStatus::Accepted);
    a.apply(&receiver(), &schedule()).unwrap();
    assert_eq!(a.view().status, ReferralStatus::Scheduled);
}

#[test]
fn the_rule_does_not_depend_on_merge_order() {
    let mut base = new_referral(1);
    base.apply(&receiver(), &ReferralOp::Accept).unwrap();
    let mut x = replica(&mut base, 2);
    let mut y = replica(&mut base, 3);
    let mut z = replica(&mut base, 4);
    x.apply(&sender(), &ReferralOp::Cancel).unwrap();
    y.apply(&receiver(), &schedule()).unwrap();
    z.apply(&receiver(), &schedule()).unwrap();
    let mut one = replica(&mut x, 5);
    one.merge(&mut y).unwrap();
    one.merge(&mut z).unwrap();
    let mut two = replica(&mut z, 6);
    two.merge(&mut x).unwrap();
    two.merge(&mut y).unwrap();
    assert_eq!(one.view(), two.view());
    assert_eq!(one.view().status, ReferralStatus::Cancelled);
}

#[test]
fn save_incremental_round_trips() {
    let mut a = new_referral(1);
    let mut b = replica(&mut a, 2);
    let _ = a.save_incremental();
    for op in [ReferralOp::Accept, schedule()] {
        a.apply(&receiver(), &op).unwrap();
        b.load_incremental(&a.save_incremental()).unwrap();
        assert_eq!(a.view(), b.view());
        assert_eq!(a.heads(), b.heads());
    }
}

#[test]
fn a_decline_says_why() {
    let mut referral = new_referral(1);
    let error = referral
        .apply(
            &receiver(),
            &ReferralOp::Decline {
                reason: String::new(),
            },
        )
        .unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::Empty {
            field: "events.reason"
        })
    ));
    referral
        .apply(
            &receiver(),
            &ReferralOp::Decline {
                reason: "no cardiology bed this week".into(),
            },
        )
        .unwrap();
    let view = referral.view();
    assert_eq!(view.status, ReferralStatus::Declined);
    assert_eq!(
        view.history[0].reason.as_deref(),
        Some("no cardiology bed this week")
    );
    validate(referral.automerge()).unwrap();
}

#[test]
fn a_missed_appointment_is_booked_again_and_the_resident_arrives() {
    let mut referral = new_referral(1);
    referral.apply(&receiver(), &ReferralOp::Accept).unwrap();
    // A reschedule needs a booking to move.
    let error = referral
        .apply(
            &receiver(),
            &ReferralOp::Reschedule {
                appointment: Timestamp(1_800_000_000_000),
                minutes: None,
            },
        )
        .unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::IllegalTransition {
            from: ReferralStatus::Accepted,
            ..
        })
    ));
    referral.apply(&receiver(), &schedule()).unwrap();
    assert_eq!(referral.view().appointment_minutes, Some(30));
    let later = Timestamp(1_800_000_000_000 + 86_400_000);
    // A slot lasts a minute to a day.
    for minutes in [0, 24 * 60 + 1] {
        let refused = referral.apply(
            &receiver(),
            &ReferralOp::Reschedule {
                appointment: later,
                minutes: Some(minutes),
            },
        );
        assert!(
            matches!(
                refused,
                Err(OpError::Invalid(ValidationError::InvalidValue {
                    field: "events.minutes",
                    ..
                }))
            ),
            "{minutes} minutes: {refused:?}"
        );
    }
    // A booking without a length (as earlier releases booked) leaves it unknown.
    referral
        .apply(
            &receiver(),
            &ReferralOp::Reschedule {
                appointment: later,
                minutes: None,
            },
        )
        .unwrap();
    assert_eq!(referral.view().appointment, Some(later));
    assert_eq!(referral.view().appointment_minutes, None);
    referral
        .apply(&receiver(), &ReferralOp::MarkNoShow)
        .unwrap();
    assert_eq!(referral.view().status, ReferralStatus::NoShow);
    // Only the receiver records a no-show; from a no-show it books again or the sender cancels.
    assert!(referral.apply(&sender(), &ReferralOp::MarkNoShow).is_err());
    assert!(
        referral
            .apply(&receiver(), &ReferralOp::MarkArrived)
            .is_err()
    );
    let again = Timestamp(later.0 + 7 * 86_400_000);
    referral
        .apply(
            &receiver(),
            &ReferralOp::Reschedule {
                appointment: again,
                minutes: Some(45),
            },
        )
        .unwrap();
    referral
        .apply(&receiver(), &ReferralOp::MarkArrived)
        .unwrap();
    let view = referral.view();
    assert_eq!(view.status, ReferralStatus::Arrived);
    assert_eq!(view.appointment, Some(again));
    assert_eq!(view.appointment_minutes, Some(45));
    validate(referral.automerge()).unwrap();
}

#[test]
fn a_no_show_beats_a_concurrent_reschedule_and_loses_to_an_arrival() {
    let mut a = new_referral(1);
    a.apply(&receiver(), &ReferralOp::Accept).unwrap();
    a.apply(&receiver(), &schedule()).unwrap();
    let mut b = Referral::load(&a.save(), &actor(2)).unwrap();
    let mut c = Referral::load(&a.save(), &actor(3)).unwrap();
    a.apply(&receiver(), &ReferralOp::MarkNoShow).unwrap();
    b.apply(
        &receiver(),
        &ReferralOp::Reschedule {
            appointment: Timestamp(1_900_000_000_000),
            minutes: Some(20),
        },
    )
    .unwrap();
    c.apply(&receiver(), &ReferralOp::MarkArrived).unwrap();
    a.merge(&mut b).unwrap();
    assert_eq!(a.view().status, ReferralStatus::NoShow);
    assert_eq!(a.view().superseded().len(), 1);
    a.merge(&mut c).unwrap();
    assert_eq!(a.view().status, ReferralStatus::Arrived);
    validate(a.automerge()).unwrap();
}

#[test]
fn only_the_receiver_writes_the_return_summary() {
    let mut referral = new_referral(1);
    let summary = ReferralOp::WriteReturnSummary {
        summary: "PCI to LAD; aspirin and clopidogrel 12 months; review in 4 weeks".into(),
    };
    let error = referral.apply(&sender(), &summary).unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::Provenance {
            field: "return_summary"
        })
    ));
    referral.apply(&receiver(), &summary).unwrap();
    let view = referral.view();
    assert_eq!(
        view.return_summary.unwrap().value,
        "PCI to LAD; aspirin and clopidogrel 12 months; review in 4 weeks"
    );
    validate(referral.automerge()).unwrap();
}

/// The receiver passes a referral it cannot serve on to another member: from requested,
/// accepted, scheduled or no-show, saying to whom and why; only the receiver, never back to a
/// side; the onward referral names the original; redirected is final; a redirect beats a
/// concurrent booking and loses to a concurrent cancel.
#[test]
fn the_receiver_redirects_to_another_member_and_the_redirect_wins_over_its_own_desks_moves() {
    let district = InstitutionId::new("district-n").unwrap();
    let redirect = |to: &InstitutionId| ReferralOp::Redirect {
        to: to.clone(),
        reason: "no rehabilitation bed".into(),
    };
    for moves in [
        vec![],
        vec![ReferralOp::Accept],
        vec![ReferralOp::Accept, schedule()],
        vec![ReferralOp::Accept, schedule(), ReferralOp::MarkNoShow],
    ] {
        let mut referral = new_referral(1);
        for op in &moves {
            referral.apply(&receiver(), op).unwrap();
        }
        assert!(matches!(
            referral.apply(&sender(), &redirect(&district)),
            Err(OpError::Invalid(ValidationError::NotAuthorised { .. }))
        ));
        for side in [sender().institution, receiver().institution] {
            assert!(matches!(
                referral.apply(&receiver(), &redirect(&side)),
                Err(OpError::Invalid(ValidationError::InvalidValue {
                    field: "events.redirect",
                    ..
                }))
            ));
        }
        referral.apply(&receiver(), &redirect(&district)).unwrap();
        let view = referral.view();
        assert_eq!(view.status, ReferralStatus::Redirected);
        assert_eq!(view.redirected_to.as_ref(), Some(&district));
        assert_eq!(
            view.history.last().unwrap().reason.as_deref(),
            Some("no rehabilitation bed")
        );
        validate(referral.automerge()).unwrap();
        // Final.
        for op in [ReferralOp::Accept, schedule(), ReferralOp::MarkArrived] {
            assert!(referral.apply(&receiver(), &op).is_err(), "{op:?}");
        }
        assert!(referral.apply(&sender(), &ReferralOp::Cancel).is_err());

        let onward =
            Referral::create_onward(&actor(3), &receiver(), referral.id(), &view, &district)
                .unwrap();
        let sent = onward.view();
        assert_eq!(sent.from, receiver().institution);
        assert_eq!(sent.to, district);
        assert_eq!(sent.redirected_from, Some(referral.id()));
        assert_eq!(
            (sent.patient, sent.direction),
            (view.patient, view.direction)
        );
        assert_eq!(sent.status, ReferralStatus::Requested);
        validate(onward.automerge()).unwrap();
    }
    // Only the receiver sends an onward referral.
    let referral = new_referral(1);
    assert!(
        Referral::create_onward(
            &actor(3),
            &sender(),
            referral.id(),
            &referral.view(),
            &district,
        )
        .is_err()
    );

    // Concurrently: a redirect beats a booking of another desk, a cancel beats a redirect.
    let mut a = new_referral(1);
    a.apply(&receiver(), &ReferralOp::Accept).unwrap();
    let mut b = replica(&mut a, 2);
    let mut c = replica(&mut a, 3);
    a.apply(&receiver(), &redirect(&district)).unwrap();
    b.apply(&receiver(), &schedule()).unwrap();
    a.merge(&mut b).unwrap();
    assert_eq!(a.view().status, ReferralStatus::Redirected);
    assert_eq!(a.view().superseded().len(), 1);
    c.apply(&sender(), &ReferralOp::Cancel).unwrap();
    a.merge(&mut c).unwrap();
    assert_eq!(a.view().status, ReferralStatus::Cancelled);
    assert_eq!(a.view().redirected_to, None);
    validate(a.automerge()).unwrap();
}
