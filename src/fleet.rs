//! The operator's fleet view (`imlinkctl fleet`), without I/O: the device status documents
//! read from the broker's retained status tree (`im/{app}/d/{user}/{platform}/{instance}/status`,
//! the contract in `docs/brokers.md`), kept per device, counted, and judged — who needs
//! attention, in what order — then rendered as text or NDJSON. `ctl` does the MQTT and the
//! printing; everything here is a function of what arrived and of the clock it is given.
//!
//! Everything a device published is data: a document is decoded totally (a document that is
//! not a v1 status is "unreadable", never a panic), every string kept from it is stripped of
//! control characters and capped, and text output quotes it. A device's identity is its
//! topic's levels — which the broker's ACL pins to the login — never the payload's fields.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The status document version this reader understands.
pub const STATUS_VERSION: u64 = 1;
/// A status document is a few hundred bytes; anything over this is not one.
pub const MAX_DOC_BYTES: usize = 8 * 1024;
/// How much of one string from a device is kept (characters).
const MAX_ID: usize = 64;
const MAX_WORD: usize = 32;
const MAX_URL: usize = 128;

/// The subscription that reads every device's status.
pub fn status_filter(sdk_app_id: u64) -> String {
    format!("im/{sdk_app_id}/d/+/+/+/status")
}

/// `s` without control characters, at most `max` characters (an ellipsis marks a cut).
pub fn clean(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max * 4));
    for (n, c) in s
        .chars()
        .filter(|c| !c.is_control() && *c != '\u{2028}' && *c != '\u{2029}')
        .enumerate()
    {
        if n == max {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

// --- what a device published ----------------------------------------------------------------------

/// A device: the levels of its status topic (`.` in platform and instance arrives as `_`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId {
    pub user: String,
    pub platform: String,
    pub instance: String,
}

impl DeviceId {
    /// `user/platform/instance`, for a human.
    pub fn display(&self) -> String {
        format!("{}/{}/{}", self.user, self.platform, self.instance)
    }
}

/// The device a status topic belongs to, or `None` when `topic` is not one of `sdk_app_id`'s
/// status topics.
pub fn parse_topic(sdk_app_id: u64, topic: &str) -> Option<DeviceId> {
    let app = sdk_app_id.to_string();
    let mut l = topic.split('/');
    let (im, a, d) = (l.next()?, l.next()?, l.next()?);
    let (user, platform, instance, status) = (l.next()?, l.next()?, l.next()?, l.next()?);
    let ok = im == "im"
        && a == app
        && d == "d"
        && status == "status"
        && l.next().is_none()
        && [user, platform, instance].iter().all(|s| !s.is_empty());
    ok.then(|| DeviceId {
        user: clean(user, MAX_ID),
        platform: clean(platform, MAX_ID),
        instance: clean(instance, MAX_ID),
    })
}

/// The device's state, as the contract names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Online,
    Offline,
    LoggedOut,
    Stopped,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Online,
        State::Offline,
        State::LoggedOut,
        State::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Online => "online",
            State::Offline => "offline",
            State::LoggedOut => "logged_out",
            State::Stopped => "stopped",
        }
    }

    fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// Where the UserSig's renewal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Renewal {
    Ok,
    Renewing,
    Failing,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ErrorKey {
    pub class: String,
    pub code: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SigState {
    pub expires_at: Option<i64>,
    pub renewal: Renewal,
    pub failures: u32,
}

/// One v1 status document, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub state: State,
    pub reason: Option<String>,
    pub phase: Option<String>,
    pub login_status: Option<u8>,
    pub version: Option<String>,
    pub since: Option<i64>,
    pub at: Option<i64>,
    pub last_error: Option<ErrorKey>,
    pub user_sig: Option<SigState>,
    pub broker: Option<String>,
    pub protocol: Option<String>,
    pub outbox_pending: Option<u64>,
    pub inbox_unacked: Option<u64>,
}

/// Why a document is unreadable, for the operator.
fn wrong(field: &str, what: &str) -> String {
    format!("{field} is not {what}")
}

fn opt<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn opt_str(v: &Value, key: &str, max: usize) -> Result<Option<String>, String> {
    match opt(v, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(clean(s, max))),
        Some(_) => Err(wrong(key, "a string")),
    }
}

fn opt_i64(v: &Value, key: &str) -> Result<Option<i64>, String> {
    match opt(v, key) {
        None => Ok(None),
        Some(x) => x
            .as_i64()
            .map(Some)
            .ok_or_else(|| wrong(key, "a whole number")),
    }
}

fn opt_u64(v: &Value, key: &str) -> Result<Option<u64>, String> {
    match opt(v, key) {
        None => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| wrong(key, "a count (a whole number ≥ 0)")),
    }
}

/// Decode a status document. Unknown fields are ignored (newer daemons add some); a `v`
/// other than 1, a missing or unknown `state`, or a field of the wrong type make it
/// unreadable (the error says which).
pub fn parse_doc(payload: &[u8]) -> Result<Doc, String> {
    if payload.len() > MAX_DOC_BYTES {
        return Err(format!(
            "{} bytes: a status document is at most {MAX_DOC_BYTES}",
            payload.len()
        ));
    }
    let v: Value = serde_json::from_slice(payload).map_err(|_| "not JSON".to_string())?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    match v.get("v").and_then(Value::as_u64) {
        Some(STATUS_VERSION) => {}
        Some(n) => return Err(format!("version {n}; this imlinkctl reads version 1")),
        None => return Err("no version (v)".into()),
    }
    let state = match v.get("state") {
        Some(Value::String(s)) => State::parse(s).ok_or_else(|| {
            format!(
                "state {} is not online, offline, logged_out or stopped",
                crate::session::quote_external(s, MAX_WORD)
            )
        })?,
        _ => return Err("no state".into()),
    };
    let login_status = match opt_u64(&v, "login_status")? {
        None => None,
        Some(n @ 1..=3) => Some(n as u8),
        Some(_) => return Err(wrong("login_status", "1, 2 or 3")),
    };
    let last_error = match opt(&v, "last_error") {
        None => None,
        Some(e) if e.is_object() => Some(ErrorKey {
            class: opt_str(e, "class", MAX_WORD)?.unwrap_or_else(|| "unknown".into()),
            code: opt_u64(e, "code")?
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(0),
        }),
        Some(_) => return Err(wrong("last_error", "an object or null")),
    };
    let user_sig = match opt(&v, "user_sig") {
        None => None,
        Some(s) if s.is_object() => Some(SigState {
            expires_at: opt_i64(s, "expires_at")?,
            renewal: match opt(s, "renewal").and_then(Value::as_str) {
                Some("ok") | None => Renewal::Ok,
                Some("renewing") => Renewal::Renewing,
                Some("failing") => Renewal::Failing,
                Some(_) => return Err(wrong("user_sig.renewal", "ok, renewing or failing")),
            },
            failures: opt_u64(s, "failures")?
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
                .unwrap_or(0),
        }),
        Some(_) => return Err(wrong("user_sig", "an object or null")),
    };
    Ok(Doc {
        state,
        reason: opt_str(&v, "reason", MAX_WORD)?,
        phase: opt_str(&v, "phase", MAX_WORD)?,
        login_status,
        version: opt_str(&v, "version", MAX_WORD)?,
        since: opt_i64(&v, "since")?,
        at: opt_i64(&v, "at")?,
        last_error,
        user_sig,
        broker: opt_str(&v, "broker", MAX_URL)?,
        protocol: opt_str(&v, "protocol", MAX_WORD)?,
        outbox_pending: opt_u64(&v, "outbox_pending")?,
        inbox_unacked: opt_u64(&v, "inbox_unacked")?,
    })
}

// --- the fleet ----------------------------------------------------------------------------------

/// What the reader holds of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub reading: Result<Doc, String>,
    /// When this reader saw the device go offline (a live will, while watching). Unknown for
    /// a device that was already offline when the reader came: the will's `since` is when
    /// its last connection began, not when it ended.
    pub offline_seen_at: Option<i64>,
}

/// Why a device needs attention, most severe first (the order of the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Concern {
    /// The service was stopped, or the daemon stopped on an error a retry cannot fix.
    Stopped,
    /// Kicked: another login took the identity, or an administrator.
    Kicked,
    /// The UserSig's renewal keeps failing.
    RenewalFailing,
    /// Offline longer than the threshold (or possibly: see [`Offline`]).
    Offline,
    /// Logged out by a local app or operator.
    LoggedOut,
    /// Its document cannot be read.
    Unreadable,
}

impl Concern {
    pub fn as_str(self) -> &'static str {
        match self {
            Concern::Stopped => "stopped",
            Concern::Kicked => "kicked",
            Concern::RenewalFailing => "renewal_failing",
            Concern::Offline => "offline",
            Concern::LoggedOut => "logged_out",
            Concern::Unreadable => "unreadable",
        }
    }
}

/// How long an offline device has been offline, as far as this reader can know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offline {
    /// It was seen going offline this many seconds ago.
    For(i64),
    /// It was already offline; its last connection began this many seconds ago, so it has
    /// been offline for at most that long.
    AtMost(i64),
    /// Already offline, and its document says nothing of when it connected.
    Unknown,
}

/// A change worth one line in `--watch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new device, or a device whose state, phase, error, renewal, node or version changed.
    Updated {
        id: DeviceId,
        was: Option<(Option<State>, Option<String>)>,
    },
    /// Its retained status was deleted.
    Removed { id: DeviceId },
    /// It has now been offline longer than the threshold (seen going offline while watching).
    OfflineTooLong { id: DeviceId },
}

/// The devices of one SDKAppID, by topic.
#[derive(Debug)]
pub struct Fleet {
    sdk_app_id: u64,
    offline_longer_than: i64,
    devices: BTreeMap<DeviceId, Device>,
    /// Devices seen going offline, by the instant they cross the threshold.
    crossings: BTreeSet<(i64, DeviceId)>,
    /// Messages on the subscription that were not a status topic of this app.
    pub ignored: u64,
}

/// The part of a document a `--watch` line is about (not `at`, not the queue counts).
fn watched(d: &Device) -> impl PartialEq + '_ {
    match &d.reading {
        Ok(doc) => (
            Some((
                doc.state,
                &doc.phase,
                &doc.reason,
                &doc.last_error,
                doc.user_sig.as_ref().map(|s| (s.renewal, s.failures)),
                &doc.broker,
                &doc.protocol,
                &doc.version,
                doc.login_status,
            )),
            None,
        ),
        Err(e) => (None, Some(e)),
    }
}

impl Fleet {
    pub fn new(sdk_app_id: u64, offline_longer_than: Duration) -> Fleet {
        Fleet {
            sdk_app_id,
            offline_longer_than: offline_longer_than.as_secs() as i64,
            devices: BTreeMap::new(),
            crossings: BTreeSet::new(),
            ignored: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn device(&self, id: &DeviceId) -> Option<&Device> {
        self.devices.get(id)
    }

    /// Take one message of the status subscription. `retained`: the broker sent it because
    /// of the subscription (the RETAIN flag), not as it happened. Returns the change a
    /// watcher should see, if any.
    pub fn apply(
        &mut self,
        topic: &str,
        payload: &[u8],
        retained: bool,
        now: i64,
    ) -> Option<Change> {
        let Some(id) = parse_topic(self.sdk_app_id, topic) else {
            self.ignored += 1;
            return None;
        };
        if payload.is_empty() {
            self.forget_crossing(&id);
            return self.devices.remove(&id).map(|_| Change::Removed { id });
        }
        let reading = parse_doc(payload);
        let is_offline = |r: &Result<Doc, String>| matches!(r, Ok(d) if d.state == State::Offline);
        let old = self.devices.get(&id);
        let offline_seen_at = match (old, is_offline(&reading)) {
            (_, false) => None,
            // Still offline: keep what was known.
            (Some(o), true) if is_offline(&o.reading) => o.offline_seen_at,
            // It went offline as this reader watched.
            (_, true) if !retained => Some(now),
            (_, true) => None,
        };
        let new = Device {
            reading,
            offline_seen_at,
        };
        let was = old.map(|o| {
            let doc = o.reading.as_ref().ok();
            (doc.map(|d| d.state), doc.and_then(|d| d.phase.clone()))
        });
        let changed = old.is_none_or(|o| watched(o) != watched(&new));
        let old_seen = old.and_then(|o| o.offline_seen_at);
        if old_seen != new.offline_seen_at {
            if let Some(seen) = old_seen {
                self.crossings.remove(&(self.crossing(seen), id.clone()));
            }
            if let Some(seen) = new.offline_seen_at {
                self.crossings.insert((self.crossing(seen), id.clone()));
            }
        }
        self.devices.insert(id.clone(), new);
        changed.then_some(Change::Updated { id, was })
    }

    /// The first whole second at which a device seen going offline at `seen` has been
    /// offline *longer* than the threshold.
    fn crossing(&self, seen: i64) -> i64 {
        seen + self.offline_longer_than + 1
    }

    fn forget_crossing(&mut self, id: &DeviceId) {
        if let Some(seen) = self.devices.get(id).and_then(|d| d.offline_seen_at) {
            self.crossings.remove(&(self.crossing(seen), id.clone()));
        }
    }

    /// When the next device seen going offline crosses the threshold (Unix seconds).
    pub fn next_crossing(&self) -> Option<i64> {
        self.crossings.first().map(|(t, _)| *t)
    }

    /// The devices that have crossed the threshold by `now`, each once.
    pub fn crossed(&mut self, now: i64) -> Vec<Change> {
        let mut out = Vec::new();
        while let Some((t, _)) = self.crossings.first() {
            if *t > now {
                break;
            }
            if let Some((_, id)) = self.crossings.pop_first() {
                out.push(Change::OfflineTooLong { id });
            }
        }
        out
    }

    /// How long `d` has been offline, as far as this reader knows (`None`: not offline).
    pub fn offline(&self, d: &Device, now: i64) -> Option<Offline> {
        let doc = d
            .reading
            .as_ref()
            .ok()
            .filter(|x| x.state == State::Offline)?;
        Some(match (d.offline_seen_at, doc.since) {
            (Some(seen), _) => Offline::For(elapsed(now, seen)),
            // The device's own word: any i64 (saturating, never an overflow).
            (None, Some(since)) => Offline::AtMost(elapsed(now, since)),
            (None, None) => Offline::Unknown,
        })
    }

    /// Why `d` needs attention (empty: it does not), most severe first.
    pub fn concerns(&self, d: &Device, now: i64) -> Vec<Concern> {
        let doc = match &d.reading {
            Ok(doc) => doc,
            Err(_) => return vec![Concern::Unreadable],
        };
        let phase = doc.phase.as_deref();
        let mut out = Vec::new();
        if doc.state == State::Stopped || phase == Some("stopped") {
            out.push(Concern::Stopped);
        }
        if phase == Some("kicked") || doc.last_error.as_ref().is_some_and(|e| e.class == "kicked") {
            out.push(Concern::Kicked);
        }
        if doc
            .user_sig
            .as_ref()
            .is_some_and(|s| s.renewal == Renewal::Failing)
        {
            out.push(Concern::RenewalFailing);
        }
        let too_long = match self.offline(d, now) {
            Some(Offline::For(s) | Offline::AtMost(s)) => s > self.offline_longer_than,
            Some(Offline::Unknown) => true,
            None => false,
        };
        if too_long {
            out.push(Concern::Offline);
        }
        if doc.state == State::LoggedOut {
            out.push(Concern::LoggedOut);
        }
        out
    }

    /// How long `d` has been in its condition (seconds; for sorting: longer is worse).
    fn age(&self, d: &Device, now: i64) -> i64 {
        match self.offline(d, now) {
            Some(Offline::For(s) | Offline::AtMost(s)) => s,
            Some(Offline::Unknown) => 0,
            None => d
                .reading
                .as_ref()
                .ok()
                .and_then(|doc| doc.since)
                .map_or(0, |s| elapsed(now, s)),
        }
    }

    /// The devices that need attention: by their most severe concern, then the longest in
    /// it first, then by topic.
    pub fn attention(&self, now: i64) -> Vec<(&DeviceId, &Device, Vec<Concern>)> {
        let mut out: Vec<_> = self
            .devices
            .iter()
            .filter_map(|(id, d)| {
                let c = self.concerns(d, now);
                (!c.is_empty()).then_some((id, d, c))
            })
            .collect();
        out.sort_by(|a, b| {
            (a.2[0], std::cmp::Reverse(self.age(a.1, now)), a.0).cmp(&(
                b.2[0],
                std::cmp::Reverse(self.age(b.1, now)),
                b.0,
            ))
        });
        out
    }

    /// The counts of the report.
    pub fn summary(&self, now: i64) -> Summary {
        let mut s = Summary {
            devices: self.devices.len(),
            ..Summary::default()
        };
        for st in State::ALL {
            s.by_state.insert(st.as_str(), 0);
        }
        for d in self.devices.values() {
            match &d.reading {
                Ok(doc) => {
                    *s.by_state.entry(doc.state.as_str()).or_default() += 1;
                    let phase = doc.phase.clone().unwrap_or_else(|| "none".into());
                    *s.by_phase.entry(phase).or_default() += 1;
                    if let Some(e) = &doc.last_error {
                        *s.by_error.entry(e.clone()).or_default() += 1;
                    }
                }
                Err(_) => s.unreadable += 1,
            }
            if !self.concerns(d, now).is_empty() {
                s.attention += 1;
            }
        }
        s
    }
}

/// The counts of a report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub devices: usize,
    pub by_state: BTreeMap<&'static str, usize>,
    /// By the phase in the document (`none` for a will, which has none).
    pub by_phase: BTreeMap<String, usize>,
    pub by_error: BTreeMap<ErrorKey, usize>,
    pub unreadable: usize,
    pub attention: usize,
}

// --- rendering ----------------------------------------------------------------------------------

/// `YYYY-MM-DD HH:MM:SSZ` (UTC) of Unix seconds.
pub fn utc(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Seconds from `then` to `now`, 0 when `then` is later: `then` comes from a device's
/// document, any i64, so the difference saturates instead of overflowing.
fn elapsed(now: i64, then: i64) -> i64 {
    now.saturating_sub(then).max(0)
}

/// A duration in seconds, coarsely (`45s`, `12m`, `5h`, `3d`).
pub fn span(s: i64) -> String {
    crate::session::short(s.saturating_mul(1000))
}

fn quoted(s: &str) -> String {
    crate::session::quote_external(s, MAX_URL)
}

/// What a device's row says about it, for a human.
fn describe(fleet: &Fleet, d: &Device, now: i64) -> String {
    let doc = match &d.reading {
        Ok(doc) => doc,
        Err(e) => return format!("unreadable status document: {e}"),
    };
    let mut parts = Vec::new();
    match fleet.offline(d, now) {
        Some(Offline::For(s)) => parts.push(format!("offline for {}", span(s))),
        Some(Offline::AtMost(s)) => parts.push(format!(
            "offline, last connected {} ago (offline for an unknown part of that)",
            span(s)
        )),
        Some(Offline::Unknown) => parts.push("offline since an unknown time".into()),
        None => {
            let since = doc
                .since
                .map(|s| format!(" for {}", span(elapsed(now, s))))
                .unwrap_or_default();
            parts.push(format!("{}{since}", doc.state.as_str()));
        }
    }
    if let Some(p) = &doc.phase
        && p != doc.state.as_str()
    {
        parts.push(format!("phase {p}"));
    }
    if let Some(r) = &doc.reason {
        parts.push(quoted(r));
    }
    if let Some(e) = &doc.last_error {
        parts.push(format!("last error {} {}", e.class, e.code));
    }
    if let Some(s) = &doc.user_sig
        && s.renewal != Renewal::Ok
    {
        let expiry = s
            .expires_at
            .map(|t| format!(", UserSig expires {}", utc(t)))
            .unwrap_or_default();
        parts.push(format!(
            "renewal {} ({} failed){expiry}",
            match s.renewal {
                Renewal::Ok => "ok",
                Renewal::Renewing => "renewing",
                Renewal::Failing => "failing",
            },
            s.failures
        ));
    }
    if let Some(v) = &doc.version {
        parts.push(format!("v{}", quoted(v)));
    }
    parts.join(", ")
}

/// The report for a human: counts by state, phase and last error, then the devices that
/// need attention.
pub fn render_text(fleet: &Fleet, now: i64) -> String {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = write_text(fleet, now, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// [`render_text`], written line by line to `out` (10,000 devices are never one string).
pub fn write_text(fleet: &Fleet, now: i64, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let s = fleet.summary(now);
    writeln!(
        out,
        "fleet of SDKAppID {} at {}: {} devices",
        fleet.sdk_app_id,
        utc(now),
        s.devices
    )?;
    let join = |items: Vec<String>| {
        if items.is_empty() {
            "—".to_string()
        } else {
            items.join(", ")
        }
    };
    let mut states: Vec<String> = State::ALL
        .iter()
        .map(|st| {
            let n = s.by_state.get(st.as_str()).copied().unwrap_or(0);
            format!("{} {n}", st.as_str())
        })
        .collect();
    if s.unreadable > 0 {
        states.push(format!("unreadable {}", s.unreadable));
    }
    writeln!(out, "  by state:      {}", join(states))?;
    let mut phases: Vec<(&String, &usize)> = s.by_phase.iter().collect();
    phases.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    writeln!(
        out,
        "  by phase:      {}",
        join(phases.iter().map(|(k, n)| format!("{k} {n}")).collect())
    )?;
    let mut errors: Vec<(&ErrorKey, &usize)> = s.by_error.iter().collect();
    errors.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    writeln!(
        out,
        "  by last error: {}",
        join(
            errors
                .iter()
                .map(|(e, n)| format!("{} {} ×{n}", e.class, e.code))
                .collect()
        )
    )?;
    let attention = fleet.attention(now);
    if attention.is_empty() {
        return writeln!(
            out,
            "no device needs attention (none stopped, kicked, failing renewal, offline longer \
             than {} or logged out)",
            span(fleet.offline_longer_than)
        );
    }
    writeln!(
        out,
        "needs attention: {} (offline: longer than {})",
        attention.len(),
        span(fleet.offline_longer_than)
    )?;
    for (id, d, concerns) in attention {
        let names: Vec<&str> = concerns.iter().map(|c| c.as_str()).collect();
        writeln!(
            out,
            "  {:<16} {} {}",
            names.join(","),
            quoted(&id.display()),
            describe(fleet, d, now)
        )?;
    }
    Ok(())
}

/// One device as a JSON object (the NDJSON line `{"type":"device",…}`).
pub fn device_json(fleet: &Fleet, id: &DeviceId, d: &Device, now: i64) -> Value {
    let concerns: Vec<&str> = fleet.concerns(d, now).iter().map(|c| c.as_str()).collect();
    let mut v = json!({
        "type": "device",
        "user_id": id.user,
        "platform": id.platform,
        "instance": id.instance,
        "attention": concerns,
    });
    let Some(m) = v.as_object_mut() else {
        return v;
    };
    match &d.reading {
        Err(e) => {
            m.insert("unreadable".into(), json!(e));
        }
        Ok(doc) => {
            let (offline_for, at_most) = match fleet.offline(d, now) {
                Some(Offline::For(s)) => (Some(s), None),
                Some(Offline::AtMost(s)) => (None, Some(s)),
                _ => (None, None),
            };
            for (k, x) in [
                ("unreadable", Value::Null),
                ("state", json!(doc.state)),
                ("reason", json!(doc.reason)),
                ("phase", json!(doc.phase)),
                ("login_status", json!(doc.login_status)),
                ("version", json!(doc.version)),
                ("since", json!(doc.since)),
                ("at", json!(doc.at)),
                ("last_error", json!(doc.last_error)),
                ("user_sig", json!(doc.user_sig)),
                ("broker", json!(doc.broker)),
                ("protocol", json!(doc.protocol)),
                ("outbox_pending", json!(doc.outbox_pending)),
                ("inbox_unacked", json!(doc.inbox_unacked)),
                ("offline_for", json!(offline_for)),
                ("offline_for_at_most", json!(at_most)),
            ] {
                m.insert(k.into(), x);
            }
        }
    }
    v
}

/// The summary as the last NDJSON line of a report (`{"type":"summary",…}`).
pub fn summary_json(fleet: &Fleet, now: i64) -> Value {
    let s = fleet.summary(now);
    let errors: Vec<Value> = s
        .by_error
        .iter()
        .map(|(e, n)| json!({ "class": e.class, "code": e.code, "devices": n }))
        .collect();
    json!({
        "type": "summary",
        "sdk_app_id": fleet.sdk_app_id,
        "at": now,
        "devices": s.devices,
        "by_state": s.by_state,
        "unreadable": s.unreadable,
        "by_phase": s.by_phase,
        "by_error": errors,
        "attention": s.attention,
        "offline_longer_than": fleet.offline_longer_than,
    })
}

/// Every line of an NDJSON report: one object per device (in topic order), then the summary.
pub fn render_ndjson(fleet: &Fleet, now: i64) -> String {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = write_ndjson(fleet, now, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// [`render_ndjson`], written line by line to `out`.
pub fn write_ndjson(fleet: &Fleet, now: i64, out: &mut impl std::io::Write) -> std::io::Result<()> {
    for (id, d) in &fleet.devices {
        writeln!(out, "{}", device_json(fleet, id, d, now))?;
    }
    writeln!(out, "{}", summary_json(fleet, now))
}

/// One `--watch` line for a change: text (`HH:MM:SS "user/platform/instance" was → now …`)
/// or an NDJSON object.
pub fn change_line(fleet: &Fleet, change: &Change, now: i64, as_json: bool) -> String {
    let clock = &utc(now)[11..19];
    let (id, kind) = match change {
        Change::Removed { id } => (id, "removed"),
        Change::Updated { id, .. } => (id, "change"),
        Change::OfflineTooLong { id } => (id, "attention"),
    };
    let Some(d) = fleet.devices.get(id).filter(|_| kind != "removed") else {
        return if as_json {
            json!({ "type": "removed", "at": now, "user_id": id.user,
                    "platform": id.platform, "instance": id.instance })
            .to_string()
        } else {
            format!(
                "{clock} {} removed (its status was deleted)",
                quoted(&id.display())
            )
        };
    };
    let was = match change {
        Change::Updated { was: Some(w), .. } => Some(w),
        _ => None,
    };
    if as_json {
        let was = was.map_or(Value::Null, |(s, p)| json!({ "state": s, "phase": p }));
        return json!({ "type": kind, "at": now, "device": device_json(fleet, id, d, now),
                       "was": was })
        .to_string();
    }
    let concerns: Vec<&str> = fleet.concerns(d, now).iter().map(|c| c.as_str()).collect();
    let flag = if concerns.is_empty() {
        String::new()
    } else {
        format!(" [needs attention: {}]", concerns.join(","))
    };
    let before = match (change, was) {
        (Change::Updated { was: None, .. }, _) => "new: ".to_string(),
        (_, Some((s, _))) => format!("{} → ", s.map_or("unreadable", State::as_str)),
        _ => String::new(),
    };
    format!(
        "{clock} {} {before}{}{flag}",
        quoted(&id.display()),
        describe(fleet, d, now)
    )
}

// --- the command line ------------------------------------------------------------------------------

/// Which MQTT version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[serde(rename = "v5")]
    V5,
    #[serde(rename = "v3.1.1")]
    V311,
    /// MQTT 5, and 3.1.1 when a node does not take it (NATS speaks only 3.1.1).
    #[serde(rename = "auto")]
    Auto,
}

impl Protocol {
    fn parse(s: &str) -> Option<Protocol> {
        match s {
            "v5" | "5" => Some(Protocol::V5),
            "v3.1.1" | "3.1.1" | "v311" => Some(Protocol::V311),
            "auto" => Some(Protocol::Auto),
            _ => None,
        }
    }
}

/// `imlinkctl fleet`'s settings, from the command line over the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetArgs {
    /// Broker nodes, tried in order: `(host, port, url)`.
    pub brokers: Vec<(String, u16, String)>,
    pub ca: Option<PathBuf>,
    pub user: String,
    pub password_file: PathBuf,
    /// The MQTT client id (`None`: `imlinkctl-fleet-{pid}-{ms}`, a fresh one each run).
    pub client_id: Option<String>,
    pub sdk_app_id: u64,
    pub protocol: Protocol,
    pub offline_longer_than: Duration,
    pub settle: Duration,
    pub json: bool,
    pub watch: bool,
}

/// The config file (`--config FILE`, TOML): the same settings as the flags; paths relative
/// to the file's directory. No password in it: `password_file`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    #[serde(default)]
    pub brokers: Vec<String>,
    pub ca: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub client_id: Option<String>,
    pub sdk_app_id: Option<u64>,
    pub protocol: Option<Protocol>,
    pub offline_longer_than: Option<crate::config::Dur>,
    pub settle: Option<crate::config::Dur>,
}

impl FleetFile {
    /// Parse the text of a config file named `path` (for the messages and relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<FleetFile, String> {
        let mut f: FleetFile = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [&mut f.ca, &mut f.password_file].into_iter().flatten() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(f)
    }
}

pub const FLEET_USAGE: &str = "\
imlinkctl fleet — every device's status, read from the broker's retained status tree

USAGE:
  imlinkctl fleet [--config FILE] [--broker URL]... [--ca FILE] [--user NAME]
                  [--password-file FILE] [--client-id ID] [--sdk-app-id N]
                  [--protocol v5|v3.1.1|auto]
                  [--offline-longer-than 10m] [--settle 1s] [--json] [--watch]

  --broker URL            mqtts://host:port; repeat for the nodes of a cluster (tried in order)
  --ca FILE               the CA that signs the broker's certificate (default: the system's)
  --user NAME             the operator identity (it may read im/{app}/d/#)
  --password-file FILE    its password or token, in a file only you can read (0600); never on
                          the command line
  --client-id ID          the MQTT client id (default: imlinkctl-fleet-PID-MS, fresh each run)
  --sdk-app-id N          whose devices
  --protocol P            v5 (default), v3.1.1 (NATS), or auto (5, then 3.1.1)
  --offline-longer-than D an offline device needs attention after this long (default 10m)
  --settle D              the retained tree counts as read once nothing new came for this
                          long (default 1s)
  --json                  NDJSON: one object per device, then one summary object
  --watch                 after the report, one line per change, forever (reconnects)
  --config FILE           TOML with the same keys: brokers = [..], ca, user, password_file,
                          client_id, sdk_app_id, protocol, offline_longer_than, settle
                          (flags win)

Exit codes: 0 ok, 1 failed, 2 usage, 3 broker unreachable, 4 credentials or subscription refused.
";

/// Parse `imlinkctl fleet`'s arguments; `read_config` reads a config file's text (I/O stays
/// with the caller).
pub fn parse_args(
    args: &[String],
    read_config: impl Fn(&Path) -> Result<String, String>,
) -> Result<FleetArgs, String> {
    let mut file = FleetFile::default();
    let mut brokers: Vec<String> = Vec::new();
    let (mut ca, mut user, mut password_file, mut sdk_app_id) = (None, None, None, None);
    let mut client_id = None;
    let (mut protocol, mut offline, mut settle) = (None, None, None);
    let (mut json_out, mut watch) = (false, false);
    let mut it = args.iter();
    let dur = |flag: &str, v: &str| {
        crate::config::parse_duration(v)
            .ok_or_else(|| format!("{flag} {v:?}: use e.g. 30s, 10m, 2h"))
    };
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--config" => {
                let p = PathBuf::from(value()?);
                file = FleetFile::parse(&read_config(&p)?, &p)?;
            }
            "--broker" => brokers.push(value()?),
            "--ca" => ca = Some(PathBuf::from(value()?)),
            "--user" => user = Some(value()?),
            "--password-file" => password_file = Some(PathBuf::from(value()?)),
            "--client-id" => client_id = Some(value()?),
            "--password" => {
                return Err(
                    "a password on the command line can be read by any local user \
                            (ps, /proc/PID/cmdline): put it in a file only you can read \
                            (chmod 600) and pass --password-file FILE"
                        .into(),
                );
            }
            "--sdk-app-id" => {
                let v = value()?;
                sdk_app_id = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("--sdk-app-id {v:?}: a number"))?,
                );
            }
            "--protocol" => {
                let v = value()?;
                protocol = Some(
                    Protocol::parse(&v)
                        .ok_or_else(|| format!("--protocol {v:?}: v5, v3.1.1 or auto"))?,
                );
            }
            "--offline-longer-than" => offline = Some(dur(flag, &value()?)?),
            "--settle" => settle = Some(dur(flag, &value()?)?),
            "--json" => json_out = true,
            "--watch" => watch = true,
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    if brokers.is_empty() {
        brokers = file.brokers.clone();
    }
    if brokers.is_empty() {
        return Err("no broker: pass --broker mqtts://host:port (repeat it for each node)".into());
    }
    let brokers = brokers
        .iter()
        .map(|u| crate::url::parse_broker_url(u).map(|(h, p)| (h, p, u.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    let settle = settle
        .or(file.settle.map(|d| d.0))
        .unwrap_or(Duration::from_secs(1));
    if settle.is_zero() {
        return Err("--settle must be more than 0".into());
    }
    Ok(FleetArgs {
        brokers,
        ca: ca.or(file.ca),
        user: user
            .or(file.user)
            .ok_or("no operator identity: pass --user NAME")?,
        password_file: password_file
            .or(file.password_file)
            .ok_or("no password: pass --password-file FILE (a file only you can read)")?,
        client_id: client_id.or(file.client_id),
        sdk_app_id: sdk_app_id
            .or(file.sdk_app_id)
            .ok_or("whose devices? pass --sdk-app-id N")?,
        protocol: protocol.or(file.protocol).unwrap_or(Protocol::V5),
        offline_longer_than: offline
            .or(file.offline_longer_than.map(|d| d.0))
            .unwrap_or(Duration::from_secs(600)),
        settle,
        json: json_out,
        watch,
    })
}

#[cfg(test)]
mod tests;
