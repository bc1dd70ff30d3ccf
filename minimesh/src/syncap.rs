//! A SYN tap on one interface of a pod, to prove which connections carried
//! meshlane's TCP option on the wire (and which did not), without tcpdump.
//!
//! An AF_PACKET socket sees both directions of an interface, including
//! outgoing packets before they leave.

use crate::netns::Netns;
use anyhow::{anyhow, bail, Context, Result};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// How often the reader looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// One captured segment: a SYN (SYN set, ACK clear), or any segment that carries an
/// experimental TCP option (kind 253 or 254), which is where meshlane's stamp would show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynRecord {
    /// SYN set and ACK clear (a connection opening); false for other stamped segments.
    pub syn: bool,
    /// Connecting side.
    pub src: SocketAddrV4,
    /// Destination as it appeared on the wire (after any NAT on the sender).
    pub dst: SocketAddrV4,
    /// TCP options in order, as (kind, data without kind/length bytes);
    /// NOP and end-of-list are left out.
    pub options: Vec<(u8, Vec<u8>)>,
}

impl SynRecord {
    /// Whether the SYN carried an option of this kind.
    pub fn has_option(&self, kind: u8) -> bool {
        self.options.iter().any(|(k, _)| *k == kind)
    }
}

/// A running capture; [`SynCapture::stop`] returns what it saw.
#[derive(Debug)]
pub struct SynCapture {
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<SynRecord>>>,
}

/// Opens the packet socket inside the namespace (interfaces and packet
/// sockets are per netns) and binds it to `ifname`.
fn open_packet_socket(ifname: &str) -> Result<OwnedFd> {
    let ifindex = nix::net::if_::if_nametoindex(ifname)
        .with_context(|| format!("no interface {ifname:?}"))?;
    // Protocol 0: receive nothing until bound, so no packet from another
    // interface slips in between socket() and bind().
    // SAFETY: plain syscall.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET, SOCK_RAW)");
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as libc::c_ushort;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = i32::try_from(ifindex).context("ifindex out of range")?;
    // SAFETY: pointer and length describe `sll`.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("bind AF_PACKET socket to {ifname} (ifindex {ifindex})"));
    }
    // Every frame on the interface is queued (ETH_P_ALL), bulk data included; with the default
    // buffer a busy machine let the reader fall behind and a SYN after a 300 KiB echo was
    // dropped (a CI rehearsal). Root may raise it past rmem_max.
    let size: libc::c_int = 16 << 20;
    // SAFETY: pointer and length describe `size`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVBUFFORCE on the packet socket");
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: POLL.as_micros() as libc::suseconds_t,
    };
    // SAFETY: pointer and length describe `timeout`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO on the packet socket");
    }
    Ok(fd)
}

impl SynCapture {
    /// Starts capturing on `ifname` inside `ns`. Packets that arrive before
    /// this returns are captured; stop() drains what is queued.
    pub fn start(ns: &Netns, ifname: &str) -> Result<SynCapture> {
        let fd = ns
            .run(|| open_packet_socket(ifname))?
            .with_context(|| format!("SYN capture on {}/{ifname}", ns.name()))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stopping);
        let thread = std::thread::Builder::new()
            .name(format!("syncap-{ifname}"))
            .spawn(move || read_loop(&fd, &flag))
            .context("spawning the SYN capture thread")?;
        Ok(SynCapture {
            stopping,
            thread: Some(thread),
        })
    }

    /// Stops the capture and returns the SYNs seen, in arrival order.
    pub fn stop(mut self) -> Vec<SynRecord> {
        self.finish().unwrap_or_else(|e| {
            eprintln!("minimesh syncap: {e:#}");
            Vec::new()
        })
    }

    fn finish(&mut self) -> Result<Vec<SynRecord>> {
        self.stopping.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow!("SYN capture thread panicked")),
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for SynCapture {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

fn read_loop(fd: &OwnedFd, stopping: &AtomicBool) -> Vec<SynRecord> {
    let mut records = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let stop = stopping.load(Ordering::SeqCst);
        // Once asked to stop, drain what is already queued without waiting.
        let flags = if stop { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if !stop => continue,
                Some(libc::EAGAIN) => return records,
                _ => {
                    eprintln!("minimesh syncap: recv: {err}");
                    return records;
                }
            }
        }
        let len = usize::try_from(n).unwrap_or(0).min(buf.len());
        if let Ok(Some(record)) = parse_syn(&buf[..len]) {
            records.push(record);
        }
    }
}

fn be16(b: &[u8], at: usize) -> Result<u16> {
    match b.get(at..at + 2) {
        Some(s) => Ok(u16::from_be_bytes([s[0], s[1]])),
        None => bail!("truncated at {at}"),
    }
}

/// Parses an Ethernet frame; `Some` when it is an IPv4 TCP SYN without ACK.
fn parse_syn(frame: &[u8]) -> Result<Option<SynRecord>> {
    let mut l3 = 14;
    let mut ethertype = be16(frame, 12)?;
    if ethertype == ETH_P_8021Q {
        ethertype = be16(frame, 16)?;
        l3 = 18;
    }
    if ethertype != ETH_P_IP {
        return Ok(None);
    }
    let ip = frame.get(l3..).context("no IPv4 header")?;
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Ok(None);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let fragment_offset = be16(ip, 6)? & 0x1fff;
    if ip[9] != libc::IPPROTO_TCP as u8 || ihl < 20 || fragment_offset != 0 {
        return Ok(None);
    }
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let tcp = ip.get(ihl..).context("truncated IPv4 header")?;
    if tcp.len() < 20 {
        bail!("truncated TCP header");
    }
    let flags = tcp[13];
    let syn = flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0;
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    let opts = tcp.get(20..data_offset).context("truncated TCP options")?;
    let options = parse_options(opts)?;
    if !syn && !options.iter().any(|(k, _)| *k == 253 || *k == 254) {
        return Ok(None);
    }
    Ok(Some(SynRecord {
        syn,
        src: SocketAddrV4::new(src_ip, be16(tcp, 0)?),
        dst: SocketAddrV4::new(dst_ip, be16(tcp, 2)?),
        options,
    }))
}

fn parse_options(mut opts: &[u8]) -> Result<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    while let Some(&kind) = opts.first() {
        match kind {
            0 => break,             // end of option list
            1 => opts = &opts[1..], // NOP
            _ => {
                let len = usize::from(*opts.get(1).context("option without length")?);
                if len < 2 || len > opts.len() {
                    bail!("bad length {len} for TCP option {kind}");
                }
                out.push((kind, opts[2..len].to_vec()));
                opts = &opts[len..];
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SYN from 10.0.0.1:40000 to 10.0.0.2:80 with MSS 1460, NOP, NOP,
    /// SACK-permitted, an experimental option 253 carrying 4 bytes, then
    /// end-of-list padding to a 4-byte boundary.
    fn syn_frame(flags: u8) -> Vec<u8> {
        let opts: Vec<u8> = vec![
            2, 4, 0x05, 0xb4, 1, 1, 4, 2, 253, 6, 0xde, 0xad, 0xbe, 0xef, 0, 0,
        ];
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let tcp_len = 20 + opts.len();
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip[2..4].copy_from_slice(&u16::try_from(20 + tcp_len).expect("len").to_be_bytes());
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = u8::try_from(tcp_len / 4).expect("doff") << 4;
        tcp[13] = flags;
        f.extend_from_slice(&tcp);
        f.extend_from_slice(&opts);
        f
    }

    #[test]
    fn parses_syn_and_options() {
        let rec = parse_syn(&syn_frame(TCP_FLAG_SYN))
            .expect("parse")
            .expect("a SYN");
        assert_eq!(rec.src, "10.0.0.1:40000".parse().expect("addr"));
        assert_eq!(rec.dst, "10.0.0.2:80".parse().expect("addr"));
        assert_eq!(
            rec.options,
            vec![
                (2, vec![0x05, 0xb4]),
                (4, vec![]),
                (253, vec![0xde, 0xad, 0xbe, 0xef])
            ]
        );
        assert!(rec.has_option(253));
        assert!(!rec.has_option(8));
    }

    #[test]
    fn keeps_other_segments_only_when_they_carry_an_experimental_option() {
        // The test frame carries option 253: a stamped ACK is kept, marked as not a SYN.
        let ack = parse_syn(&syn_frame(TCP_FLAG_ACK))
            .expect("parse")
            .expect("stamped ACK kept");
        assert!(!ack.syn && ack.has_option(253));
        assert!(
            parse_syn(&syn_frame(TCP_FLAG_SYN))
                .expect("parse")
                .expect("SYN")
                .syn
        );
        // Without it, SYN-ACKs and ACKs are ignored.
        let mut plain = syn_frame(TCP_FLAG_SYN | TCP_FLAG_ACK);
        let opt = plain.len() - 8;
        plain[opt] = 1; // turn kind 253 into NOPs and end-of-list
        plain[opt + 1..].fill(0);
        assert_eq!(parse_syn(&plain).expect("parse"), None);
        plain[14 + 20 + 13] = TCP_FLAG_ACK; // Ethernet + IPv4 headers, then TCP's flags byte
        assert_eq!(parse_syn(&plain).expect("parse"), None);
        let mut arp = syn_frame(TCP_FLAG_SYN);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse_syn(&arp).expect("parse"), None);
    }
}
