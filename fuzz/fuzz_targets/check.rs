//! cargo fuzz run check: any text through the command checks must not panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let policies = devbox_safety::PolicySet::new(&[]).expect("default policy");
        let _ = devbox_safety::check(text, &devbox_safety::CheckContext::default(), &policies);
    }
});
