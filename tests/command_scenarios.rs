//! The given/when/then harness on the bank domain.

use eventcore::Error;
use eventcore::testing::CommandScenario;
use eventcore_tests::bank::{BankEvent, Open, Transfer, account};

#[test]
fn a_transfer_withdraws_and_deposits() {
    let (a, b) = (account(1), account(2));
    CommandScenario::new()
        .given(&a, [BankEvent::Opened { initial: 50 }])
        .given(&b, [BankEvent::Opened { initial: 0 }])
        .when(&Transfer {
            from: a.clone(),
            to: b.clone(),
            amount: 20,
        })
        .then_events([
            (a, BankEvent::Withdrawn { amount: 20 }),
            (b, BankEvent::Deposited { amount: 20 }),
        ]);
}

#[test]
fn an_overdraft_is_refused() {
    let (a, b) = (account(1), account(2));
    CommandScenario::new()
        .given(
            &a,
            [
                BankEvent::Opened { initial: 50 },
                BankEvent::Withdrawn { amount: 40 },
            ],
        )
        .given(&b, [BankEvent::Opened { initial: 0 }])
        .when(&Transfer {
            from: a,
            to: b,
            amount: 20,
        })
        .then_business_rule_violation("insufficient funds");
}

#[test]
fn events_of_other_streams_are_not_folded() {
    let (a, b, c) = (account(1), account(2), account(3));
    // `c` is rich, but the command does not read it.
    CommandScenario::new()
        .given(&a, [BankEvent::Opened { initial: 5 }])
        .given(&c, [BankEvent::Opened { initial: 1_000 }])
        .given(&b, [BankEvent::Opened { initial: 0 }])
        .when(&Transfer {
            from: a,
            to: b,
            amount: 20,
        })
        .then_error(|e| matches!(e, Error::BusinessRuleViolation(m) if m == "insufficient funds"));
}

#[test]
fn opening_twice_is_refused_and_opening_once_writes_one_event() {
    let a = account(1);
    CommandScenario::new()
        .when(&Open {
            account: a.clone(),
            initial: 10,
        })
        .then_events([(a.clone(), BankEvent::Opened { initial: 10 })]);
    CommandScenario::new()
        .given(&a, [BankEvent::Opened { initial: 10 }])
        .when(&Open {
            account: a,
            initial: 10,
        })
        .then_business_rule_violation("already open");
}

#[test]
#[should_panic(expected = "the command wrote other events")]
fn a_wrong_expectation_fails_the_scenario() {
    let a = account(1);
    CommandScenario::new()
        .when(&Open {
            account: a.clone(),
            initial: 10,
        })
        .then_events([(a, BankEvent::Opened { initial: 11 })]);
}
