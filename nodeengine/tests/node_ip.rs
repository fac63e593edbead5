//! The node's `ip` as upstream takes it: the first non-loopback IPv4 address
//! in interface-index order (not name order), read anew for every report.
//! Checked in a network namespace of the test's own.

use nodeengine::node_report::{NodeSampler, StaticFacts, primary_ipv4};
use testkit::Netns;

testkit::main! {
    first_ipv4_in_interface_index_order_read_for_every_report: [Root],
}

fn first_ipv4_in_interface_index_order_read_for_every_report() {
    let ns = Netns::new("neip").expect("namespace");
    // Created first, so it has the lower index, though its name sorts last.
    ns.add_veth("zz0", "zz1", None).expect("veth").keep();
    ns.add_veth("aa0", "aa1", None).expect("veth").keep();
    ns.add_address("zz0", "198.51.100.9/24")
        .expect("addr")
        .keep();
    ns.add_address("aa0", "198.51.100.7/24")
        .expect("addr")
        .keep();
    for dev in ["zz0", "zz1", "aa0", "aa1"] {
        ns.set_up(dev).expect("up");
    }
    let first = ns.within(primary_ipv4).expect("inside the namespace");
    assert_eq!(first, "198.51.100.9");

    // The address changes; the next report has the new one.
    ns.del_address("zz0", "198.51.100.9/24").expect("del");
    ns.add_address("zz0", "198.51.100.11/24")
        .expect("addr")
        .keep();
    let doc = ns
        .within(|| {
            NodeSampler::new(StaticFacts {
                virtualization: vec![],
                supported_addons: vec![],
                csi_drivers: vec![],
                port: "3000".into(),
            })
            .sample("n")
        })
        .expect("inside the namespace");
    assert_eq!(doc.ip, "198.51.100.11");
}
