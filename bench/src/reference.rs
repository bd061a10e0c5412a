//! Reference sock_ops programs the bench measures ours against, side by side
//! in the same runs. They are loaded from raw instructions (no toolchain and
//! none of our maps) and attached to the bench cgroup like ours:
//!
//! - **Floor**: at PASSIVE_ESTABLISHED it asks for state callbacks, as ours
//!   does, and otherwise returns at once. What the invocations alone cost: the
//!   floor of any sock_ops design that learns of closes.
//! - **LPM counter**: the least the design asks for. At accept, the remote
//!   IPv4 address's counter in an LPM trie (created at zero when absent) gets
//!   +1; at TCP_CLOSE, -1. No port filter, no per-socket state, no events, no
//!   agent: a lower bound of any program that keeps per-IP counts in an LPM
//!   trie, as ours must.
//! - **Hash counter**: the same with an exact-match hash map, to show what the
//!   trie itself costs.
//! - **LPM counter with events**: the LPM counter, and per accept and close a
//!   40-byte event (the socket's cookie, the address, the change) into a ring
//!   buffer without waking anyone, which a thread of the bench drains every
//!   100 ms as our agent does. What getting each connection to user space
//!   costs on top of the counter, with none of our agent's work on it.

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Map, MapData, RingBuf},
    programs::loaded_programs,
};

use crate::kernel::ProgramStats;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reference {
    Floor,
    LpmCounter,
    HashCounter,
    LpmCounterEvents,
}

impl Reference {
    pub fn label(self) -> &'static str {
        match self {
            Reference::Floor => "floor: a sock_ops program that only asks for state callbacks",
            Reference::LpmCounter => {
                "LPM counter: per-IP count in an LPM trie, +1 at accept, -1 at close, nothing else"
            }
            Reference::HashCounter => "hash counter: the same in an exact-match hash map",
            Reference::LpmCounterEvents => {
                "LPM counter with events: the same, plus a 40-byte ring-buffer event per accept \
                 and close, drained every 100 ms by a reader thread"
            }
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Reference::Floor => "floor",
            Reference::LpmCounter => "LPM counter",
            Reference::HashCounter => "hash counter",
            Reference::LpmCounterEvents => "LPM counter with events",
        }
    }
}

/// A reference program attached to a cgroup; detached (and its maps freed)
/// when dropped.
pub struct ReferenceSockOps {
    id: u32,
    // Field order is drop order: the link (detach) before the maps.
    _link: OwnedFd,
    _program: OwnedFd,
    map: Option<OwnedFd>,
    reader: Option<EventReader>,
}

/// Drains a reference program's ring buffer every 100 ms (as the agent does
/// on its timer) and counts the events.
struct EventReader {
    stop: Arc<AtomicBool>,
    read: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const DRAIN_EVERY: Duration = Duration::from_millis(100);

impl EventReader {
    fn start(ring: OwnedFd) -> Result<Self> {
        let data = MapData::from_fd(ring).context("opening the reference ring buffer")?;
        let mut ring =
            RingBuf::try_from(Map::RingBuf(data)).context("mapping the reference ring buffer")?;
        let stop = Arc::new(AtomicBool::new(false));
        let read = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, read) = (stop.clone(), read.clone());
            std::thread::spawn(move || loop {
                let done = stop.load(Ordering::Relaxed);
                let mut n = 0;
                while let Some(event) = ring.next() {
                    n += u64::from(event.len() == EVENT_BYTES as usize);
                }
                read.fetch_add(n, Ordering::Relaxed);
                if done {
                    return;
                }
                std::thread::sleep(DRAIN_EVERY);
            })
        };
        Ok(Self {
            stop,
            read,
            thread: Some(thread),
        })
    }
}

impl Drop for EventReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;
/// As our agent's default ring.
const RING_BYTES: u32 = 4 << 20;
/// As our events.
const EVENT_BYTES: i32 = 40;
const BPF_F_NO_PREALLOC: u32 = 1;

/// Room for the bench's 65,024 sources and then some.
const COUNTER_ENTRIES: u32 = 1 << 17;

/// bpf(2) with `attr` (a zero-padded prefix of `union bpf_attr`).
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i32> {
    // SAFETY: attr is a valid, fully initialised repr(C) prefix of bpf_attr
    // whose pointers (if any) outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret as i32)
}

/// A bpf(2) command that returns a new descriptor, which the caller then owns.
fn bpf_new_fd<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The head of `union bpf_attr` for BPF_MAP_CREATE.
#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

fn create_map(mut create: MapCreate, what: &'static str) -> Result<OwnedFd> {
    bpf_new_fd(BPF_MAP_CREATE, &mut create).with_context(|| format!("creating the {what}"))
}

/// A counter map keyed like an LPM trie key for an IPv4 /32 (prefix length,
/// then the address), with a u64 value.
fn create_counter_map(map_type: u32) -> Result<OwnedFd> {
    let create = MapCreate {
        map_type,
        key_size: 8,
        value_size: 8,
        max_entries: COUNTER_ENTRIES,
        // An LPM trie must allocate on demand; the hash gets its fastest
        // form, preallocated.
        map_flags: if map_type == BPF_MAP_TYPE_LPM_TRIE {
            BPF_F_NO_PREALLOC
        } else {
            0
        },
    };
    create_map(create, "reference counter map")
}

fn create_ring() -> Result<OwnedFd> {
    let create = MapCreate {
        map_type: BPF_MAP_TYPE_RINGBUF,
        max_entries: RING_BYTES,
        ..MapCreate::default()
    };
    create_map(create, "reference ring buffer")
}

/// Just enough of an eBPF assembler for these programs: instructions, labels
/// and jumps to them.
#[derive(Default)]
struct Assembler {
    insns: Vec<u64>,
    labels: HashMap<&'static str, usize>,
    jumps: Vec<(usize, &'static str)>,
}

// Opcodes (class | size/source | mode/operation).
const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const LDX_W: u8 = 0x61;
const STX_W: u8 = 0x63;
const STX_DW: u8 = 0x7b;
const ST_W: u8 = 0x62;
const ST_DW: u8 = 0x7a;
const JA: u8 = 0x05;
const JEQ_IMM: u8 = 0x15;
const JNE_IMM: u8 = 0x55;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
/// BPF_STX | BPF_DW | BPF_ATOMIC; the immediate picks the operation (0: add).
const ATOMIC_DW: u8 = 0xdb;
const PSEUDO_MAP_FD: u8 = 1;

// Registers.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const R10: u8 = 10;

// struct bpf_sock_ops offsets, callbacks, helpers.
const OPS_OP: i16 = 0;
const OPS_ARG1: i16 = 8;
const OPS_REMOTE_IP4: i16 = 24;
const PASSIVE_ESTABLISHED_CB: i32 = 5;
const STATE_CB: i32 = 10;
const TCP_CLOSE: i32 = 7;
const STATE_CB_FLAG: i32 = 4;
const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_MAP_UPDATE: i32 = 2;
const HELPER_CB_FLAGS_SET: i32 = 59;
const HELPER_GET_SOCKET_COOKIE: i32 = 46;
const HELPER_RINGBUF_OUTPUT: i32 = 130;
const BPF_RB_NO_WAKEUP: i32 = 1;
const BPF_NOEXIST: i32 = 1;

impl Assembler {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Self {
        self.insns.push(
            code as u64
                | ((src << 4 | dst) as u64) << 8
                | (off as u16 as u64) << 16
                | (imm as u32 as u64) << 32,
        );
        self
    }

    fn jump(&mut self, code: u8, dst: u8, imm: i32, to: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), to));
        self.op(code, dst, 0, 0, imm)
    }

    fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.insert(name, self.insns.len());
        self
    }

    /// dst = the map behind `fd` (a two-slot instruction the loader resolves).
    fn load_map(&mut self, dst: u8, fd: i32) -> &mut Self {
        self.op(LD_IMM64, dst, PSEUDO_MAP_FD, 0, fd)
            .op(0, 0, 0, 0, 0)
    }

    fn finish(mut self) -> Vec<u64> {
        for (at, to) in std::mem::take(&mut self.jumps) {
            let target = self.labels[to] as i64;
            let off = (target - at as i64 - 1) as i16;
            self.insns[at] |= (off as u16 as u64) << 16;
        }
        self.insns
    }
}

fn floor_program() -> Vec<u64> {
    let mut asm = Assembler::default();
    asm.op(MOV64_REG, R6, R1, 0, 0)
        .op(LDX_W, R2, R1, OPS_OP, 0)
        .jump(JNE_IMM, R2, PASSIVE_ESTABLISHED_CB, "out")
        .op(MOV64_REG, R1, R6, 0, 0)
        .op(MOV64_IMM, R2, 0, 0, STATE_CB_FLAG)
        .op(CALL, 0, 0, 0, HELPER_CB_FLAGS_SET)
        .label("out")
        .op(MOV64_IMM, R0, 0, 0, 1)
        .op(EXIT, 0, 0, 0, 0);
    asm.finish()
}

/// The counter in `map`; with `ring`, an event per change too.
fn counter_program(map: i32, ring: Option<i32>) -> Vec<u64> {
    let mut asm = Assembler::default();
    asm.op(MOV64_REG, R6, R1, 0, 0)
        .op(LDX_W, R2, R6, OPS_OP, 0)
        .jump(JEQ_IMM, R2, PASSIVE_ESTABLISHED_CB, "open")
        .jump(JNE_IMM, R2, STATE_CB, "out")
        .op(LDX_W, R2, R6, OPS_ARG1, 0)
        .jump(JNE_IMM, R2, TCP_CLOSE, "out")
        // r7: what to add, -1 at close.
        .op(MOV64_IMM, R7, 0, 0, -1)
        .jump(JA, 0, 0, "count")
        .label("open")
        .op(MOV64_REG, R1, R6, 0, 0)
        .op(MOV64_IMM, R2, 0, 0, STATE_CB_FLAG)
        .op(CALL, 0, 0, 0, HELPER_CB_FLAGS_SET)
        .op(MOV64_IMM, R7, 0, 0, 1)
        .label("count")
        // The key at fp-8: prefix length 32, then the address.
        .op(LDX_W, R2, R6, OPS_REMOTE_IP4, 0)
        .op(STX_W, R10, R2, -4, 0)
        .op(ST_W, R10, 0, -8, 32)
        .load_map(R1, map)
        .op(MOV64_REG, R2, R10, 0, 0)
        .op(ADD64_IMM, R2, 0, 0, -8)
        .op(CALL, 0, 0, 0, HELPER_MAP_LOOKUP)
        .jump(JNE_IMM, R0, 0, "add")
        // Absent: only an accept creates the counter (at zero, if nobody did first).
        .jump(JNE_IMM, R7, 1, "out")
        .op(ST_DW, R10, 0, -16, 0)
        .load_map(R1, map)
        .op(MOV64_REG, R2, R10, 0, 0)
        .op(ADD64_IMM, R2, 0, 0, -8)
        .op(MOV64_REG, R3, R10, 0, 0)
        .op(ADD64_IMM, R3, 0, 0, -16)
        .op(MOV64_IMM, R4, 0, 0, BPF_NOEXIST)
        .op(CALL, 0, 0, 0, HELPER_MAP_UPDATE)
        .load_map(R1, map)
        .op(MOV64_REG, R2, R10, 0, 0)
        .op(ADD64_IMM, R2, 0, 0, -8)
        .op(CALL, 0, 0, 0, HELPER_MAP_LOOKUP)
        .jump(JEQ_IMM, R0, 0, "out")
        .label("add")
        .op(ATOMIC_DW, R0, R7, 0, 0);
    if let Some(ring) = ring {
        // The event at fp-56: cookie, address, change, zeros to 40 bytes.
        asm.op(MOV64_REG, R1, R6, 0, 0)
            .op(CALL, 0, 0, 0, HELPER_GET_SOCKET_COOKIE)
            .op(STX_DW, R10, R0, -56, 0)
            .op(LDX_W, R2, R10, -4, 0)
            .op(STX_W, R10, R2, -48, 0)
            .op(STX_W, R10, R7, -44, 0)
            .op(ST_DW, R10, 0, -40, 0)
            .op(ST_DW, R10, 0, -32, 0)
            .op(ST_DW, R10, 0, -24, 0)
            .load_map(R1, ring)
            .op(MOV64_REG, R2, R10, 0, 0)
            .op(ADD64_IMM, R2, 0, 0, -56)
            .op(MOV64_IMM, R3, 0, 0, EVENT_BYTES)
            .op(MOV64_IMM, R4, 0, 0, BPF_RB_NO_WAKEUP)
            .op(CALL, 0, 0, 0, HELPER_RINGBUF_OUTPUT);
    }
    asm.label("out")
        .op(MOV64_IMM, R0, 0, 0, 1)
        .op(EXIT, 0, 0, 0, 0);
    asm.finish()
}

impl ReferenceSockOps {
    pub fn attach(reference: Reference, cgroup: &Path) -> Result<Self> {
        let map = match reference {
            Reference::Floor => None,
            Reference::LpmCounter | Reference::LpmCounterEvents => {
                Some(create_counter_map(BPF_MAP_TYPE_LPM_TRIE)?)
            }
            Reference::HashCounter => Some(create_counter_map(BPF_MAP_TYPE_HASH)?),
        };
        let ring = match reference {
            Reference::LpmCounterEvents => Some(create_ring()?),
            _ => None,
        };
        let instructions = match &map {
            None => floor_program(),
            Some(map) => {
                counter_program(map.as_raw_fd(), ring.as_ref().map(|ring| ring.as_raw_fd()))
            }
        };
        let license = b"GPL\0";
        let mut log = vec![0u8; 64 * 1024];
        #[repr(C)]
        #[derive(Default)]
        struct ProgLoad {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
            prog_name: [u8; 16],
            prog_ifindex: u32,
            expected_attach_type: u32,
        }
        let mut name = [0u8; 16];
        let short = match reference {
            Reference::Floor => &b"ref_floor"[..],
            Reference::LpmCounter => b"ref_lpm_count",
            Reference::HashCounter => b"ref_hash_count",
            Reference::LpmCounterEvents => b"ref_lpm_events",
        };
        name[..short.len()].copy_from_slice(short);
        let mut load = ProgLoad {
            prog_type: BPF_PROG_TYPE_SOCK_OPS,
            insn_cnt: instructions.len() as u32,
            insns: instructions.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            prog_name: name,
            ..ProgLoad::default()
        };
        let program = match bpf_new_fd(BPF_PROG_LOAD, &mut load) {
            Ok(program) => program,
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                bail!(
                    "loading the {} program: {e}\n{}",
                    reference.short(),
                    String::from_utf8_lossy(&log[..end])
                );
            }
        };

        let group =
            std::fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        #[repr(C)]
        #[derive(Default)]
        struct LinkCreate {
            prog_fd: u32,
            target_fd: u32,
            attach_type: u32,
            flags: u32,
            _rest: [u64; 4],
        }
        let mut create = LinkCreate {
            prog_fd: program.as_raw_fd() as u32,
            target_fd: group.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_SOCK_OPS,
            ..LinkCreate::default()
        };
        let link = bpf_new_fd(BPF_LINK_CREATE, &mut create)
            .with_context(|| format!("attaching the {} program", reference.short()))?;

        // bpf_prog_info up to `id` (type, id).
        let mut info = [0u32; 2];
        #[repr(C)]
        struct InfoByFd {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut get = InfoByFd {
            bpf_fd: program.as_raw_fd() as u32,
            info_len: std::mem::size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut get).context("program info")?;
        let reader = ring.map(EventReader::start).transpose()?;
        Ok(Self {
            id: info[1],
            _link: link,
            _program: program,
            map,
            reader,
        })
    }

    /// The counter map's entries and the sum of their values, or None for the
    /// floor. After a run whose connections all closed, every accept made an
    /// entry and every close took its +1 back: entries > 0 and a zero sum
    /// show the program did its work.
    pub fn counters(&self) -> Result<Option<(u64, i64)>> {
        let Some(map) = &self.map else {
            return Ok(None);
        };
        #[repr(C)]
        struct MapElem {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value_or_next_key: u64,
            flags: u64,
        }
        let (mut entries, mut sum) = (0u64, 0i64);
        let mut key = [0u32; 2];
        let mut next = [0u32; 2];
        let mut first = true;
        loop {
            let mut get = MapElem {
                map_fd: map.as_raw_fd() as u32,
                _pad: 0,
                // A null key asks for the first one.
                key: if first { 0 } else { key.as_ptr() as u64 },
                value_or_next_key: next.as_mut_ptr() as u64,
                flags: 0,
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut get) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                Err(e) => return Err(e).context("walking the reference counter map"),
            }
            first = false;
            key = next;
            let mut value = 0i64;
            let mut lookup = MapElem {
                map_fd: map.as_raw_fd() as u32,
                _pad: 0,
                key: key.as_ptr() as u64,
                value_or_next_key: &mut value as *mut i64 as u64,
                flags: 0,
            };
            bpf(BPF_MAP_LOOKUP_ELEM, &mut lookup).context("reading a reference counter")?;
            entries += 1;
            sum += value;
        }
        Ok(Some((entries, sum)))
    }

    /// Events the reader has drained so far (None without events). It drains
    /// every 100 ms, so a caller waiting for a count polls.
    pub fn events_read(&self) -> Option<u64> {
        let reader = self.reader.as_ref()?;
        Some(reader.read.load(Ordering::Relaxed))
    }

    pub fn stats(&self) -> Result<ProgramStats> {
        for program in loaded_programs() {
            let program = program.context("listing loaded programs")?;
            if program.id() == self.id {
                return Ok(ProgramStats {
                    run_time_ns: program.run_time().as_nanos() as u64,
                    run_count: program.run_count(),
                });
            }
        }
        bail!("the reference sock_ops program (id {}) is gone", self.id)
    }
}
