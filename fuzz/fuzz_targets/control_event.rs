//! The control functions' Lambda events: function URLs, schedules, direct invocations.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fluidity_aws::fuzzing::control_event(data));
