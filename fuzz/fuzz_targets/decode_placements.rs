//! The placements file (a receiver's highest placement per stream): any bytes decode to
//! a table or a reason, never a panic or an allocation the bytes do not justify; a
//! decoded table encodes back to the same bytes.
#![no_main]

use fbr_protocol::placement::PlacementTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(table) = PlacementTable::decode(data) {
        assert_eq!(table.encode(), data);
    }
});
