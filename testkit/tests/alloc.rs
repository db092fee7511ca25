//! The tracker sees what a closure allocates, on its thread only, and only while asked.

#[global_allocator]
static ALLOC: swarm_testkit::alloc::Tracking = swarm_testkit::alloc::Tracking;

use swarm_testkit::alloc::largest_allocation;

#[test]
fn the_largest_allocation_is_seen() {
    let (v, largest) = largest_allocation(|| vec![7u8; 1 << 20]);
    assert_eq!(v.len(), 1 << 20);
    assert!(largest >= 1 << 20, "saw {largest} bytes");
    let (_, small) = largest_allocation(|| Box::new(5u64));
    assert!((8..1 << 20).contains(&small), "saw {small} bytes");
    // Not tracking: nothing is kept for the next call.
    let _big = vec![0u8; 4 << 20];
    let (_, none) = largest_allocation(|| ());
    assert_eq!(none, 0);
}

#[test]
fn other_threads_do_not_count() {
    let (_, largest) = largest_allocation(|| {
        std::thread::spawn(|| vec![1u8; 8 << 20])
            .join()
            .unwrap()
            .len()
    });
    assert!(largest < 8 << 20, "saw {largest} bytes from another thread");
}
