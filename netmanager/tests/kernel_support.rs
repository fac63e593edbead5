//! The kernel check on this machine's kernel: probing BPF features needs
//! root, so this runs on the kit's harness (not run, never passed, without).

use aya::util::KernelVersion;
use netmanager::kernel_support::check;

testkit::main! {
    this_kernel_passes_and_its_answers_match_its_version: [Root],
}

fn this_kernel_passes_and_its_answers_match_its_version() {
    let s = check().expect("the test machine runs a supported kernel");
    assert!(s.missing.is_empty(), "{:?}", s.missing);
    let v = KernelVersion::current().expect("readable kernel version");
    // Mainline versions; a vendor kernel with backports may say yes earlier.
    if v >= KernelVersion::new(6, 6, 0) {
        assert!(s.tcx, "TCX probe said no on {v}");
    }
    if v >= KernelVersion::new(6, 3, 0) {
        assert!(s.adjust_room_decap_l3, "decap flag probe said no on {v}");
    }
    if v < KernelVersion::new(6, 3, 0) {
        assert!(!s.adjust_room_decap_l3, "decap flag probe said yes on {v}");
    }
    if v < KernelVersion::new(6, 6, 0) {
        assert!(!s.tcx, "TCX probe said yes on {v}");
    }
}
