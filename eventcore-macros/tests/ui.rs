//! Compile tests for `#[derive(Command)]` and `#[derive(Event)]`: what must build, and
//! what must be refused with a clear, spanned error.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/command/pass/*.rs");
    cases.compile_fail("tests/ui/command/fail/*.rs");
    cases.pass("tests/ui/event/pass/*.rs");
    cases.compile_fail("tests/ui/event/fail/*.rs");
}
