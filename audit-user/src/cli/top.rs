//! `inbound-audit top`: the busiest networks right now, per service. Rows
//! are IPv4 /24 (or /32) and IPv6 /64 (or /48) networks with their live
//! sessions and, when monitors are configured, their connections,
//! receptions and rejections in one window of a monitor (those three are
//! not per service: every service's table shows the network's). Built on
//! the agent's `show count for ...` request, one per service and family per
//! refresh. `--once` prints the table as plain text; otherwise a ratatui
//! screen refreshes every second: `p` switches the prefix sizes, `s` (or
//! 1-5) the sort column, `q` quits.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use crossterm::event::{self, Event, KeyCode, KeyEventKind};
use inbound_audit::{config, serving::client};
use ratatui::{
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Paragraph, Row, Table},
    DefaultTerminal, Frame,
};

use super::report::unreachable_agent;

#[derive(clap::Args)]
pub struct TopArgs {
    /// The agent's query socket
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_SOCKET_PATH)]
    socket: PathBuf,
    /// Print the table once, as plain text, and exit.
    #[arg(long)]
    once: bool,
    /// Rows of IPv4 /32 (hosts) and IPv6 /48 (sites) instead of /24 and /64.
    #[arg(long)]
    hosts: bool,
    /// Column to sort by, largest first (cidr: by network).
    #[arg(long, value_enum, default_value_t = Column::Sessions)]
    sort: Column,
    /// Rows per service and address family.
    #[arg(long, default_value_t = 15)]
    limit: usize,
    /// Monitor (by position) whose window the event columns read.
    #[arg(long, default_value_t = 0)]
    monitor: usize,
    /// The window of that monitor (0: the current one).
    #[arg(long, default_value_t = 0)]
    window: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Column {
    Cidr,
    Sessions,
    Connections,
    Receptions,
    Rejections,
}

const COLUMNS: [Column; 5] = [
    Column::Cidr,
    Column::Sessions,
    Column::Connections,
    Column::Receptions,
    Column::Rejections,
];

impl Column {
    fn title(self) -> &'static str {
        match self {
            Column::Cidr => "NETWORK",
            Column::Sessions => "SESSIONS",
            Column::Connections => "CONNECTIONS",
            Column::Receptions => "RECEPTIONS",
            Column::Rejections => "REJECTIONS",
        }
    }

    fn next(self) -> Self {
        let i = COLUMNS.iter().position(|&c| c == self).unwrap_or(0);
        COLUMNS[(i + 1) % COLUMNS.len()]
    }
}

/// What to ask for.
struct View {
    hosts: bool,
    sort: Column,
    limit: usize,
    monitor: usize,
    window: u32,
}

/// One service's rows: the network and one count per series asked.
struct ServiceTable {
    service: String,
    rows: Vec<(String, Vec<u64>)>,
}

struct Snapshot {
    monitored: bool,
    tables: Vec<ServiceTable>,
}

fn ask(socket: &Path, request: &str) -> Result<Vec<String>, String> {
    match client::query_report(socket, request) {
        Ok(Ok(lines)) => Ok(lines),
        Ok(Err(error)) => Err(format!("{request}: {error}")),
        Err(e) => Err(format!("{}: {e}", socket.display())),
    }
}

/// Services and whether monitors exist, from `show available`.
fn available(socket: &Path) -> Result<(Vec<String>, bool), String> {
    let lines = ask(socket, "show available")?;
    let services = lines
        .iter()
        .filter_map(|l| l.strip_prefix("sessions.")?.strip_suffix(" : live"))
        .map(str::to_string)
        .collect();
    let monitored = lines.iter().any(|l| l.starts_with("connections."));
    Ok((services, monitored))
}

/// The series of one service's request, the sort column's first (the
/// agent orders by the first count), and where each lands in the columns.
fn series_for(service: &str, view: &View, monitored: bool) -> (Vec<String>, Vec<usize>) {
    let mut series = vec![format!("sessions.{service}")];
    if monitored {
        for name in ["connections", "receptions", "rejections"] {
            series.push(format!("{name}.{}@{}", view.monitor, view.window));
        }
    }
    let mut order: Vec<usize> = (0..series.len()).collect();
    let first = match view.sort {
        Column::Cidr | Column::Sessions => 0,
        Column::Connections => 1,
        Column::Receptions => 2,
        Column::Rejections => 3,
    };
    if first < series.len() {
        order.swap(0, first);
        series.swap(0, first);
    }
    (series, order)
}

fn snapshot(socket: &Path, view: &View) -> Result<Snapshot, String> {
    let (services, monitored) = available(socket)?;
    let mut tables = Vec::new();
    for service in services {
        let (series, order) = series_for(&service, view, monitored);
        let sort = if view.sort == Column::Cidr {
            "order by cidr"
        } else {
            "order by count"
        };
        let mut rows = Vec::new();
        let sizes = if view.hosts { (32, 48) } else { (24, 64) };
        for (cidr, size) in [("0.0.0.0/0", sizes.0), ("::/0", sizes.1)] {
            let request = format!(
                "show count for {cidr} in {} cidrsize {size} {sort} limit {}",
                series.join(", "),
                view.limit
            );
            for line in ask(socket, &request)? {
                let (net, counts) = line
                    .split_once(" : ")
                    .ok_or_else(|| format!("unexpected row {line:?}"))?;
                let asked: Vec<u64> = counts
                    .split(',')
                    .map(|c| c.parse().map_err(|_| format!("unexpected row {line:?}")))
                    .collect::<Result<_, _>>()?;
                // Back to column order: asked[i] is the count of column order[i].
                let mut counts = vec![0; asked.len()];
                for (i, &column) in order.iter().enumerate() {
                    counts[column] = asked[i];
                }
                rows.push((net.to_string(), counts));
            }
        }
        tables.push(ServiceTable { service, rows });
    }
    Ok(Snapshot { monitored, tables })
}

fn headers(monitored: bool) -> Vec<&'static str> {
    let n = if monitored { 5 } else { 2 };
    COLUMNS[..n].iter().map(|c| c.title()).collect()
}

/// The plain-text table of `--once`.
fn plain(snapshot: &Snapshot) -> String {
    let headers = headers(snapshot.monitored);
    let mut out = String::new();
    for table in &snapshot.tables {
        out.push_str(&format!("{}\n", table.service));
        out.push_str(&format!("{:<43}", headers[0]));
        for h in &headers[1..] {
            out.push_str(&format!(" {h:>11}"));
        }
        out.push('\n');
        if table.rows.is_empty() {
            out.push_str("(no sessions)\n");
        }
        for (net, counts) in &table.rows {
            out.push_str(&format!("{net:<43}"));
            for c in counts {
                out.push_str(&format!(" {c:>11}"));
            }
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

fn draw(frame: &mut Frame, view: &View, snapshot: &Result<Snapshot, String>) {
    let [head, body] =
        Layout::vertical([Constraint::Length(2), Constraint::Min(0)]).areas(frame.area());
    let prefixes = if view.hosts {
        "/32 and /48"
    } else {
        "/24 and /64"
    };
    frame.render_widget(
        Paragraph::new(vec![
            Line::from(format!(
                "inbound-audit top  prefixes {prefixes}  sorted by {}  monitor {} window {}",
                view.sort.title().to_lowercase(),
                view.monitor,
                view.window
            )),
            Line::from("p: switch prefix  s or 1-5: sort column  q: quit"),
        ]),
        head,
    );
    let snapshot = match snapshot {
        Ok(s) => s,
        Err(e) => {
            frame.render_widget(Paragraph::new(format!("error: {e}")), body);
            return;
        }
    };
    let areas = Layout::vertical(
        snapshot
            .tables
            .iter()
            .map(|_| Constraint::Ratio(1, snapshot.tables.len().max(1) as u32)),
    )
    .split(body);
    let headers = headers(snapshot.monitored);
    for (table, area) in snapshot.tables.iter().zip(areas.iter()) {
        let rows = table.rows.iter().map(|(net, counts)| {
            Row::new(std::iter::once(net.clone()).chain(counts.iter().map(|c| format!("{c:>11}"))))
        });
        let widths = std::iter::once(Constraint::Length(43))
            .chain(headers[1..].iter().map(|_| Constraint::Length(12)));
        let widget = Table::new(rows, widths)
            .header(
                Row::new(headers.iter().map(|h| format!("{h:>11}")))
                    .style(Style::default().add_modifier(Modifier::BOLD)),
            )
            .block(
                Block::default()
                    .borders(Borders::TOP)
                    .title(table.service.clone()),
            );
        frame.render_widget(widget, *area);
    }
}

fn interactive(socket: &Path, mut view: View) -> std::io::Result<()> {
    let mut terminal: DefaultTerminal = ratatui::init();
    let result = (|| -> std::io::Result<()> {
        loop {
            let data = snapshot(socket, &view);
            terminal.draw(|frame| draw(frame, &view, &data))?;
            let deadline = Instant::now() + Duration::from_secs(1);
            // Keys act at once; the data refreshes after each key and every second.
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if !event::poll(left)? {
                    break;
                }
                let Event::Key(key) = event::read()? else {
                    continue;
                };
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('p') => view.hosts = !view.hosts,
                    KeyCode::Char('s') => view.sort = view.sort.next(),
                    KeyCode::Char(c @ '1'..='5') => {
                        view.sort = COLUMNS[usize::from(c as u8 - b'1')];
                    }
                    _ => continue,
                }
                break;
            }
        }
    })();
    ratatui::restore();
    result
}

pub fn run(args: TopArgs) -> ExitCode {
    let view = View {
        hosts: args.hosts,
        sort: args.sort,
        limit: args.limit,
        monitor: args.monitor,
        window: args.window,
    };
    if args.once {
        return match snapshot(&args.socket, &view) {
            Ok(snapshot) => {
                print!("{}", plain(&snapshot));
                ExitCode::SUCCESS
            }
            Err(e) => {
                if let Err(io) = client::query(&args.socket, "stats") {
                    return unreachable_agent(&args.socket, &io);
                }
                eprintln!("inbound-audit top: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(io) = client::query(&args.socket, "stats") {
        return unreachable_agent(&args.socket, &io);
    }
    match interactive(&args.socket, view) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inbound-audit top: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sort_column_is_asked_first_and_put_back() {
        let view = View {
            hosts: false,
            sort: Column::Receptions,
            limit: 5,
            monitor: 1,
            window: 2,
        };
        let (series, order) = series_for("SMTP", &view, true);
        assert_eq!(
            series,
            [
                "receptions.1@2",
                "connections.1@2",
                "sessions.SMTP",
                "rejections.1@2"
            ]
        );
        assert_eq!(order, [2, 1, 0, 3]);
        let (series, _) = series_for("SMTP", &view, false);
        assert_eq!(series, ["sessions.SMTP"]);
    }

    #[test]
    fn plain_table_has_a_header_and_aligned_rows() {
        let snapshot = Snapshot {
            monitored: false,
            tables: vec![
                ServiceTable {
                    service: "SMTP".into(),
                    rows: vec![("192.0.2.0/24".into(), vec![3])],
                },
                ServiceTable {
                    service: "Submission".into(),
                    rows: vec![],
                },
            ],
        };
        let text = plain(&snapshot);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "SMTP");
        assert!(lines[1].starts_with("NETWORK") && lines[1].ends_with("SESSIONS"));
        assert_eq!(lines[2], format!("{:<43} {:>11}", "192.0.2.0/24", 3));
        assert_eq!(lines[4], "Submission");
        assert_eq!(lines[6], "(no sessions)");
    }
}
