//! The eBPF object built by `cargo xtask build-ebpf` loads into the kernel with
//! its BTF, attaches as TC ingress classifiers, and carries real traffic,
//! all inside network namespaces these tests create.

use std::{
    ffi::CString,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, PerCpuArray,
    },
    programs::{tc, SchedClassifier, TcAttachType},
    Ebpf, EbpfLoader,
};
use weft_common::{
    Counter, DataplaneConfig, EndpointEntry, EndpointKey, LeaseEntry, PeerEntry, PeerKey,
    LEASE_VXLAN, MAP_CONFIG, MAP_COUNTERS, MAP_ENDPOINTS, MAP_LEASES, MAP_PEERS, PROG_FROM_NETDEV,
    PROG_FROM_POD,
};
use weft_tests::bpf::TempBpffs;
use weft_tests::{
    exec::{bridge, ip, Cmd},
    icmp, netns,
};

const PINGS: u64 = 5;
const SENDER_ADDR: &str = "198.18.0.1";
const RECEIVER_ADDR: [u8; 4] = [198, 18, 0, 2];

fn object_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bpf/weft.bpf.o")
}

#[test]
fn from_pod_loads_with_btf_and_counts_ingress_packets() -> Result<()> {
    let bytes = read_object()?;
    let prefix = netns::unique_prefix();
    netns::sweep_leftovers(&prefix, &std::env::temp_dir());
    let lab = Namespaces::create(&prefix, ["sender", "receiver"])?;
    let (sender, receiver) = (lab.names[0].clone(), lab.names[1].clone());
    // Born in the sender namespace, its peer directly in the receiver's.
    ip(
        &sender,
        &format!("link add veth-s type veth peer name veth-r netns {receiver}"),
    )?;
    ip(&sender, &format!("addr add {SENDER_ADDR}/24 dev veth-s"))?;
    let receiver_addr = std::net::Ipv4Addr::from(RECEIVER_ADDR);
    ip(
        &receiver,
        &format!("addr add {receiver_addr}/24 dev veth-r"),
    )?;
    ip(&sender, "link set veth-s up")?;
    ip(&receiver, "link set veth-r up")?;

    // Loading, attaching and reading happen in a thread that entered the
    // receiver namespace: interface names and TC hooks resolve there.
    icmp::in_netns(&receiver.clone(), move || -> Result<()> {
        let bpffs = TempBpffs::mount()?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpffs.path())
            .load(&bytes)
            .context("loading the eBPF object")?;

        let program: &mut SchedClassifier = ebpf
            .program_mut(PROG_FROM_POD)
            .with_context(|| format!("the object has no program {PROG_FROM_POD}"))?
            .try_into()?;
        program.load().context("the verifier rejected from_pod")?;
        let info = program.info()?;
        ensure!(
            info.btf_id().is_some(),
            "from_pod was loaded without BTF: the object lacks .BTF (bpf-linker --btf)"
        );
        // clsact is what pre-6.6 kernels attach to; newer ones use TCX.
        tc::qdisc_add_clsact("veth-r").context("adding clsact to veth-r")?;
        program
            .attach("veth-r", TcAttachType::Ingress)
            .context("attaching from_pod to veth-r ingress")?;

        // No lease matches (the maps are empty): every packet is passed on.
        let before = counter(&ebpf, Counter::Passed)?;
        for attempt in 0..PINGS {
            let reply = icmp::ping(&sender, receiver_addr, 3, Duration::from_secs(1))?;
            ensure!(
                reply.is_some(),
                "ping {attempt} across the classifier got no reply (it must pass packets)"
            );
        }
        let seen = counter(&ebpf, Counter::Passed)? - before;
        ensure!(
            seen >= PINGS,
            "from_pod counted {seen} passed packets on veth-r ingress, expected at least {PINGS} echo requests"
        );
        Ok(())
    })
}

// Addresses of the two-node test: node A runs weft's programs, node B only
// the kernel's VXLAN device, as a node running flanneld would.
const NODE_A: [u8; 4] = [198, 18, 0, 11];
const NODE_B: [u8; 4] = [198, 18, 0, 12];
const POD_A: [u8; 4] = [10, 244, 1, 5];
const POD_B: [u8; 4] = [10, 244, 2, 7];
const POD_A_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 1, 5];
const POD_A_HOST_MAC: [u8; 6] = [0x0a, 0x58, 0xee, 0xee, 0xee, 0x05];
const VTEP_A: [u8; 6] = [0x0e, 0, 0, 0, 0, 0x11];
const VTEP_B: [u8; 6] = [0x0e, 0, 0, 0, 0, 0x12];
const VNI: u32 = 1;
const VXLAN_PORT: u16 = 8472;
const POD_MTU: u32 = 1450;
/// Bytes pod A streams to pod B over one TCP connection.
const STREAM_BYTES: usize = 16 << 20;
const TCP_PORT: u16 = 5201;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Pod A (behind weft's programs on node A) streams TCP to pod B behind a
/// kernel `flannel.1` on node B: from_pod encapsulates pod A's packets,
/// GSO superpackets included, and node B's kernel accepts them; node B's
/// replies are decapsulated by from_netdev and delivered into pod A.
#[test]
fn tcp_between_pods_crosses_a_kernel_vxlan_peer_through_both_programs() -> Result<()> {
    let bytes = read_object()?;
    let prefix = netns::unique_prefix();
    netns::sweep_leftovers(&prefix, &std::env::temp_dir());
    let lab = Namespaces::create(&prefix, ["poda", "nodea", "nodeb", "podb"])?;
    let [pod_a, node_a, node_b, pod_b] = [0, 1, 2, 3].map(|i| lab.names[i].clone());

    ip(
        &node_a,
        &format!("link add up0 type veth peer name up1 netns {node_b}"),
    )?;
    ip(
        &node_a,
        &format!("addr add {}/24 dev up0", Ipv4Addr::from(NODE_A)),
    )?;
    ip(
        &node_b,
        &format!("addr add {}/24 dev up1", Ipv4Addr::from(NODE_B)),
    )?;
    ip(&node_a, "link set up0 up")?;
    ip(&node_b, "link set up1 up")?;
    attach_pod(&node_a, &pod_a, POD_A, Some((POD_A_MAC, POD_A_HOST_MAC)))?;
    attach_pod(&node_b, &pod_b, POD_B, None)?;
    // Both nodes keep flannel's kernel path; node A's is the fallback for
    // whatever its programs pass.
    kernel_vxlan(
        &node_a,
        ("up0", NODE_A, VTEP_A, POD_A),
        (NODE_B, VTEP_B, POD_B),
    )?;
    kernel_vxlan(
        &node_b,
        ("up1", NODE_B, VTEP_B, POD_B),
        (NODE_A, VTEP_A, POD_A),
    )?;

    let server = spawn_in_netns(&pod_b, serve_one_stream)?;
    let node_a_ns = node_a.clone();
    let outcome = icmp::in_netns(&node_a_ns, move || -> Result<[u64; 3]> {
        let bpffs = TempBpffs::mount()?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpffs.path())
            .load(&bytes)
            .context("loading the eBPF object")?;
        fill_node_a_maps(&mut ebpf)?;
        for (program, iface) in [(PROG_FROM_POD, "vpod"), (PROG_FROM_NETDEV, "up0")] {
            let classifier: &mut SchedClassifier = ebpf
                .program_mut(program)
                .with_context(|| format!("the object has no program {program}"))?
                .try_into()?;
            classifier
                .load()
                .with_context(|| format!("the verifier rejected {program}"))?;
            let _ = tc::qdisc_add_clsact(iface);
            classifier
                .attach(iface, TcAttachType::Ingress)
                .with_context(|| format!("attaching {program} to {iface} ingress"))?;
        }
        stream_to_pod_b(&pod_a)?;
        Ok([Counter::Encap, Counter::Decap, Counter::Passed]
            .map(|c| counter(&ebpf, c).unwrap_or(0)))
    });
    let received = server
        .join()
        .map_err(|_| anyhow!("the server thread panicked"))?;
    let [encap, decap, passed] = outcome?;
    eprintln!("node A: {encap} packets encapsulated, {decap} decapsulated, {passed} passed");
    ensure!(
        received? == STREAM_BYTES,
        "pod B did not receive the whole stream"
    );
    // Pod A's TCP sends GSO superpackets: were they encapsulated whole, the
    // stream took far fewer packets than MTU-sized segments.
    let segments = (STREAM_BYTES / (POD_MTU as usize - 40)) as u64;
    ensure!(
        encap > 0 && encap < segments / 2,
        "from_pod encapsulated {encap} packets for {segments} MTU-sized segments: \
         GSO packets did not take the BPF path"
    );
    ensure!(
        decap > 0,
        "from_netdev decapsulated none of pod B's replies"
    );
    // ARP for the pods' gateways and nothing else goes the kernel's way.
    ensure!(
        passed < 20,
        "{passed} packets were passed to the kernel path"
    );
    Ok(())
}

/// A pod namespace `pod` with `ip`/24 on eth0 (MTU 1450), wired to `node` by
/// veth `vpod`, which holds the gateway address .1 as in a routed setup.
/// `macs` fixes the pod's and the host side's MACs.
fn attach_pod(
    node: &str,
    pod: &str,
    pod_ip: [u8; 4],
    macs: Option<([u8; 6], [u8; 6])>,
) -> Result<()> {
    let gateway = Ipv4Addr::from([pod_ip[0], pod_ip[1], pod_ip[2], 1]);
    ip(
        node,
        &format!("link add vpod type veth peer name eth0 netns {pod}"),
    )?;
    if let Some((pod_mac, host_mac)) = macs {
        ip(pod, &format!("link set eth0 address {}", mac(pod_mac)))?;
        ip(node, &format!("link set vpod address {}", mac(host_mac)))?;
    }
    ip(pod, &format!("link set eth0 mtu {POD_MTU} up"))?;
    ip(pod, "link set lo up")?;
    ip(
        pod,
        &format!("addr add {}/24 dev eth0", Ipv4Addr::from(pod_ip)),
    )?;
    ip(pod, &format!("route add default via {gateway}"))?;
    ip(node, &format!("addr add {gateway}/24 dev vpod"))?;
    ip(node, "link set vpod up")?;
    Cmd::new(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .netns(node)
        .run()?;
    Ok(())
}

/// flannel's kernel VXLAN setup on `node` (whose pods are `own_pod`/24):
/// `flannel.1` over `uplink` with the node's VTEP MAC and its subnet's .0
/// address, and the peer's subnet routed through it with a permanent
/// neighbour and FDB entry.
fn kernel_vxlan(
    node: &str,
    (uplink, node_ip, vtep, own_pod): (&str, [u8; 4], [u8; 6], [u8; 4]),
    (peer_ip, peer_vtep, peer_pod): ([u8; 4], [u8; 6], [u8; 4]),
) -> Result<()> {
    let subnet_zero = |pod: [u8; 4]| Ipv4Addr::from([pod[0], pod[1], pod[2], 0]);
    ip(
        node,
        &format!(
            "link add flannel.1 type vxlan id {VNI} local {} dev {uplink} dstport {VXLAN_PORT} nolearning",
            Ipv4Addr::from(node_ip)
        ),
    )?;
    ip(
        node,
        &format!("link set flannel.1 address {} mtu {POD_MTU} up", mac(vtep)),
    )?;
    ip(
        node,
        &format!("addr add {}/32 dev flannel.1", subnet_zero(own_pod)),
    )?;
    let peer_gateway = subnet_zero(peer_pod);
    ip(
        node,
        &format!(
            "neigh add {peer_gateway} lladdr {} dev flannel.1 nud permanent",
            mac(peer_vtep)
        ),
    )?;
    bridge(
        node,
        &format!(
            "fdb append {} dev flannel.1 dst {}",
            mac(peer_vtep),
            Ipv4Addr::from(peer_ip)
        ),
    )?;
    ip(
        node,
        &format!("route add {peer_gateway}/24 via {peer_gateway} dev flannel.1 onlink"),
    )?;
    Ok(())
}

/// Node A's maps as its agent would fill them: pod B's lease over VXLAN,
/// node B as the only peer, pod A as the local endpoint.
fn fill_node_a_maps(ebpf: &mut Ebpf) -> Result<()> {
    let ifindex = |name: &str| -> Result<u32> {
        let name = CString::new(name)?;
        // SAFETY: if_nametoindex(3) on a valid C string.
        match unsafe { libc::if_nametoindex(name.as_ptr()) } {
            0 => bail!("no interface {name:?} in node A"),
            index => Ok(index),
        }
    };
    let mut config: Array<_, DataplaneConfig> = Array::try_from(map(ebpf, MAP_CONFIG)?)?;
    config.set(
        0,
        DataplaneConfig {
            vni: VNI,
            vxlan_port: VXLAN_PORT,
            flags: 0,
            node_ip: NODE_A,
            uplink_ifindex: ifindex("up0")?,
            inner_mtu: POD_MTU,
            vtep_mac: VTEP_A,
            ..Default::default()
        },
        0,
    )?;
    let mut leases: LpmTrie<_, [u8; 4], LeaseEntry> = LpmTrie::try_from(map(ebpf, MAP_LEASES)?)?;
    let lease = LeaseEntry {
        public_ip: NODE_B,
        mode: LEASE_VXLAN,
        vtep_mac: VTEP_B,
        _pad: [0; 2],
    };
    leases.insert(&Key::new(24, [POD_B[0], POD_B[1], POD_B[2], 0]), lease, 0)?;
    let mut peers: HashMap<_, PeerKey, PeerEntry> = HashMap::try_from(map(ebpf, MAP_PEERS)?)?;
    peers.insert(PeerKey { public_ip: NODE_B }, PeerEntry { leases: 1 }, 0)?;
    let mut endpoints: HashMap<_, EndpointKey, EndpointEntry> =
        HashMap::try_from(map(ebpf, MAP_ENDPOINTS)?)?;
    let endpoint = EndpointEntry {
        ifindex: ifindex("vpod")?,
        pod_mac: POD_A_MAC,
        host_mac: POD_A_HOST_MAC,
    };
    endpoints.insert(EndpointKey { pod_ip: POD_A }, endpoint, 0)?;
    Ok(())
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("the object has no map {name}"))
}

/// Accepts one connection on pod B's TCP port and reads the stream to its
/// end, checking every byte; returns how many bytes came.
fn serve_one_stream(ready: mpsc::Sender<()>) -> Result<usize> {
    let listener = TcpListener::bind(SocketAddr::from((POD_B, TCP_PORT)))?;
    listener.set_nonblocking(true)?;
    let _ = ready.send(());
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("pod B accepting the stream"),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut received = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = stream.read(&mut buf).context("pod B reading the stream")?;
        if n == 0 {
            break;
        }
        for (i, byte) in buf[..n].iter().enumerate() {
            ensure!(
                *byte == pattern(received + i),
                "byte {} of the stream arrived corrupted",
                received + i
            );
        }
        received += n;
        ensure!(
            received <= STREAM_BYTES,
            "pod B received more than was sent"
        );
    }
    stream.write_all(&(received as u64).to_be_bytes())?;
    Ok(received)
}

/// Streams STREAM_BYTES from pod A to pod B and waits for pod B's count.
fn stream_to_pod_b(pod_a: &str) -> Result<()> {
    icmp::in_netns(pod_a, || {
        let address = SocketAddr::from((POD_B, TCP_PORT));
        let mut stream = TcpStream::connect_timeout(&address, IO_TIMEOUT)
            .context("pod A connecting to pod B")?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let data: Vec<u8> = (0..STREAM_BYTES).map(pattern).collect();
        stream
            .write_all(&data)
            .context("pod A streaming to pod B")?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut count = [0u8; 8];
        stream
            .read_exact(&mut count)
            .context("pod A waiting for pod B's byte count")?;
        ensure!(
            u64::from_be_bytes(count) == STREAM_BYTES as u64,
            "pod B counted {} bytes of {STREAM_BYTES}",
            u64::from_be_bytes(count)
        );
        Ok(())
    })
}

/// The stream's content: a byte sequence that shows reordering or corruption.
fn pattern(offset: usize) -> u8 {
    (offset % 251) as u8
}

/// Runs `work` on a new thread that has joined network namespace `ns`, and
/// returns once `work` signals it is ready (or has failed).
fn spawn_in_netns<T, F>(ns: &str, work: F) -> Result<JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<()>) -> Result<T> + Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    let netns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    let (ready, is_ready) = mpsc::channel();
    let handle = std::thread::spawn(move || -> Result<T> {
        // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns({path}): {}", std::io::Error::last_os_error());
        }
        work(ready)
    });
    // A dropped sender (the work failed before getting ready) also ends the wait.
    let _ = is_ready.recv_timeout(IO_TIMEOUT);
    Ok(handle)
}

fn mac(bytes: [u8; 6]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `counter` summed over CPUs.
fn counter(ebpf: &Ebpf, counter: Counter) -> Result<u64> {
    let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(
        ebpf.map(MAP_COUNTERS)
            .with_context(|| format!("the object has no map {MAP_COUNTERS}"))?,
    )?;
    let per_cpu = counters.get(&counter.index(), 0)?;
    Ok(per_cpu.iter().sum())
}

fn read_object() -> Result<Vec<u8>> {
    let object = object_path();
    std::fs::read(&object).with_context(|| {
        format!(
            "cannot read the eBPF object {}: run `cargo xtask build-ebpf` first",
            object.display()
        )
    })
}

/// Network namespaces `<prefix><role>`, deleted on drop.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn create<const N: usize>(prefix: &str, roles: [&str; N]) -> Result<Self> {
        let mut namespaces = Namespaces { names: Vec::new() };
        for role in roles {
            let name = format!("{prefix}{role}");
            netns::add(&name)?;
            namespaces.names.push(name);
        }
        Ok(namespaces)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            // Deleting the namespace also deletes its veth end and the program's hooks.
            let _ = netns::delete(name);
        }
    }
}
