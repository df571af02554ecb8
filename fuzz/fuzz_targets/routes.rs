//! The switch's route table as it comes from the controller (JSON): any bytes give a table or
//! an error, never a panic; a table written back reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmatrix_core::api::RouteTable;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = serde_json::from_slice::<RouteTable>(data) {
        let bytes = serde_json::to_vec(&t).expect("a table always serialises");
        let again: RouteTable = serde_json::from_slice(&bytes).expect("a written table reads back");
        assert_eq!(again, t);
    }
});
