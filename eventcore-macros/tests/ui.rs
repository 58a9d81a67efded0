//! Compile tests for `#[derive(Command)]`: what must build, and what must be refused
//! with a clear, spanned error.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
