//! Drives the per-stream state machines (`fbr_protocol::stream`) with arbitrary input:
//! the first byte picks the machine, the rest is read as a program of frames, stream
//! ends, timeouts, sends and new sessions (`fbr_protocol::fuzzing`). Neither machine
//! may panic, deliver out of order, or lose count of what is in flight.
#![no_main]

use fbr_protocol::fuzzing::{drive_receiver, drive_sender};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((which, rest)) = data.split_first() {
        if which % 2 == 0 {
            drive_receiver(rest);
        } else {
            drive_sender(rest);
        }
    }
});
