//! What meshlane's programs cost sockets it does not accelerate: nothing. The read tracer (the
//! unread budget's reads) must not run for reads of sockets that are not in a sockhash, and it
//! must still run for the paired sidecar ends it exists for. Run counts come from the kernel
//! (`run_cnt` with statistics enabled), so a tracer attached node-wide fails here.

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
};

use meshlane::datapath::{enable_stats, ReadTracer};
use minimesh::{CaptureConfig, EchoServer, TwoPods};
use support::*;

/// The read tracer's runs so far.
fn recv_runs(accel: &mut Accel) -> u64 {
    accel
        .dp()
        .program_stats()
        .expect("program statistics")
        .into_iter()
        .find(|(kind, _)| *kind == "recv")
        .map(|(_, p)| p.run_cnt)
        .expect("a read tracer is attached")
}

#[test]
fn reads_of_sockets_outside_the_sockhash_run_no_program() {
    let Some(mut accel) = Accel::new("cost_reads") else {
        return;
    };
    let _stats = enable_stats().expect("BPF_ENABLE_STATS (Linux 5.8+)");
    // A kernel that refuses tracing programs (no BTF, no trampolines, or a vendor's lockdown,
    // as this project's CI VM does) gets the tracepoint, which does run on every read: the
    // README says so, and only the positive half applies there.
    let exit = accel.dp().read_tracer() == Some(ReadTracer::Exit);
    if !exit {
        eprintln!("cost_reads: the read tracer is the node-wide tracepoint on this kernel");
    }
    let mesh = TwoPods::new(97, CaptureConfig::default(), CaptureConfig::default()).unwrap();
    let dst = SocketAddrV4::new(mesh.server.ip, 8080);
    let _echo = EchoServer::spawn(&mesh.server.ns, dst).unwrap();

    // Plain TCP in this process's namespace: nothing listed, nothing paired. Many one-byte reads.
    const READS: usize = 20_000;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let before = recv_runs(&mut accel);
    let mut b = [0u8; 1];
    for i in 0..READS {
        client.write_all(&[i as u8]).unwrap();
        server.read_exact(&mut b).unwrap();
        assert_eq!(b[0], i as u8);
    }
    let plain = recv_runs(&mut accel) - before;
    // Other tests' paired sockets on the node may read meanwhile; a tracer on every read would
    // add at least READS.
    if exit {
        assert!(
            plain < READS as u64 / 2,
            "{READS} reads of plain sockets ran the read tracer {plain} times"
        );
    } else {
        assert!(
            plain >= READS as u64,
            "the tracepoint saw {plain} of {READS} reads"
        );
    }

    // Listed pods: the sidecar ends of paired hops are in a sockhash, and their reads count.
    accel.add_pod(&mesh.client.ns, &mesh.client.capture);
    accel.add_pod(&mesh.server.ns, &mesh.server.capture);
    let before = recv_runs(&mut accel);
    let s = connect(&mesh.client.ns, dst).unwrap();
    let payload = pattern(7, 64 * 1024);
    let out = echo_exchange(s, &payload, 16 * 1024).unwrap();
    assert_same("echo through the paired hops", &out.bytes, &payload);
    let paired = recv_runs(&mut accel) - before;
    let c = accel.counters();
    assert_accelerated("cost_reads", &c);
    assert!(
        paired > 0,
        "the paired sidecar ends' reads ran no read tracer: {c:?}"
    );
}
