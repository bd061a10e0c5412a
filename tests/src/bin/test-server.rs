//! A minimal TCP server for the end-to-end tests, standing in for an MTA.
//!
//! `test-server ADDR...` listens on each ADDR (port 0 picks a free port), prints
//! `READY PORT...`, holds every accepted connection, and closes one when its peer
//! closes (as an MTA does at QUIT/EOF). On stdin it takes:
//! - `close IP PORT`: close our side of the connection from that peer (FIN);
//! - `count`: print how many connections are held.
//!
//! Each command is answered on stdout with one line.

use std::{
    collections::HashMap,
    io::{BufRead, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
};

type Held = Arc<Mutex<HashMap<SocketAddr, TcpStream>>>;

fn main() {
    let held: Held = Arc::default();
    let mut ports = Vec::new();
    for addr in std::env::args().skip(1) {
        let listener = TcpListener::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        ports.push(listener.local_addr().expect("bound").port().to_string());
        let held = held.clone();
        thread::spawn(move || accept_loop(listener, held));
    }
    let mut out = std::io::stdout();
    writeln!(out, "READY {}", ports.join(" ")).expect("stdout");
    out.flush().expect("stdout");
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["count"] => held.lock().unwrap().len().to_string(),
            ["close", ip, port] => match format!("{ip}:{port}")
                .parse::<SocketAddr>()
                .or_else(|_| format!("[{ip}]:{port}").parse())
            {
                Ok(peer) => match held.lock().unwrap().remove(&peer) {
                    Some(stream) => {
                        let _ = stream.shutdown(Shutdown::Both);
                        "closed".to_string()
                    }
                    None => format!("no connection from {peer}"),
                },
                Err(e) => format!("bad address: {e}"),
            },
            _ => format!("unknown command: {line}"),
        };
        writeln!(out, "{answer}").expect("stdout");
        out.flush().expect("stdout");
    }
}

fn accept_loop(listener: TcpListener, held: Held) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        held.lock().unwrap().insert(peer, stream);
        let held = held.clone();
        thread::spawn(move || serve(reader, peer, held));
    }
}

/// Reads until the peer closes (FIN or RST), then closes our side.
fn serve(mut stream: TcpStream, peer: SocketAddr, held: Held) {
    let mut buf = [0u8; 512];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    held.lock().unwrap().remove(&peer);
}
