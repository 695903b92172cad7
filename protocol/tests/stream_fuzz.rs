//! The stream machines' fuzz harnesses (`fbr_protocol::fuzzing`, also the cargo-fuzz
//! target `stream_machines`) run on random programs, so every CI run fuzzes a little:
//! neither machine may panic or break its invariants whatever a peer sends.
#![allow(clippy::unwrap_used)] // tests panic on failure by design

use fbr_protocol::fuzzing::{drive_receiver, drive_sender};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn the_receiver_survives_any_input(data in prop::collection::vec(any::<u8>(), 0..512)) {
        drive_receiver(&data);
    }

    #[test]
    fn the_sender_survives_any_input(data in prop::collection::vec(any::<u8>(), 0..512)) {
        drive_sender(&data);
    }
}
