//! How a connection ended, classified (brief §3.2): which error class, which IM code, and a
//! message a human can act on. Pure: it sees the ended connection and what the machine knows
//! about the sig in use ([`Context`]), and decides nothing else.

use super::{
    ConnEnd, EXPIRY_CLOSE_AFTER, EXPIRY_SKEW_MAX, EXPIRY_SKEW_MIN, ErrorClass, KickReason,
    LastError, MAX_REASON_CHARS, Millis, NetKind, SigClock, codes, quote_external,
};

/// What a classified failure says to do.
pub(super) struct Classified {
    pub class: ErrorClass,
    pub err: LastError,
    /// For `Kicked`: which kind.
    pub kick: Option<KickReason>,
    /// For `SigExpired`: the server called a sig expired that our clock says is still good
    /// (spends the budget); otherwise the sig simply reached its end.
    pub premature: bool,
}

/// What the machine knows when a connection ends: whether it had reached CONNACK, and where
/// the sig it was sent with stands against its deadline (on the boot clock, anchored to the
/// issuer's `Date`, like the deadline itself).
pub(super) struct Context {
    /// The connection had reached CONNACK.
    pub online: bool,
    /// Milliseconds from now to the deadline of the sig in use (negative: past it); `None`:
    /// its end is unknown (an opaque sig), so no signal is read as its expiry (the budget
    /// bounds what the server calls expired).
    pub to_deadline: Option<i64>,
    /// How far ahead of ours the server's clock may run for this sig
    /// ([`expiry_skew`]).
    pub skew: Millis,
}

impl Context {
    pub fn new(online: bool, sig: SigClock, now: Millis) -> Context {
        Context {
            online,
            to_deadline: sig.deadline.map(|d| d as i64 - now as i64),
            skew: expiry_skew(sig.lifetime),
        }
    }

    /// At or past the deadline on our own clock.
    fn expired_here(&self) -> bool {
        self.to_deadline.is_some_and(|d| d <= 0)
    }

    /// At its end: within the skew before the deadline, or past it. A refusal or a
    /// DISCONNECT (0x86, 0x87, 0x98, 0xA0) then is the server enforcing the expiry.
    fn at_end(&self) -> bool {
        self.to_deadline.is_some_and(|d| d <= self.skew as i64)
    }

    /// A silent close (no DISCONNECT) at the expiry: within the skew before the deadline, up
    /// to [`EXPIRY_CLOSE_AFTER`] after it (NATS closes the socket 0–1 s after a user JWT's
    /// `exp`, on its own clock). Later, the close is just a close.
    fn closed_at_end(&self) -> bool {
        self.to_deadline
            .is_some_and(|d| d <= self.skew as i64 && d >= -(EXPIRY_CLOSE_AFTER as i64))
    }
}

/// How far ahead of ours a server's clock may run for a sig of this lifetime: a tenth of it,
/// between [`EXPIRY_SKEW_MIN`] and [`EXPIRY_SKEW_MAX`] (unknown: the maximum). An expiry
/// signal within it of the deadline is the sig's natural end, and spends no budget.
pub fn expiry_skew(lifetime: Option<Millis>) -> Millis {
    lifetime.map_or(EXPIRY_SKEW_MAX, |l| {
        (l / 10).clamp(EXPIRY_SKEW_MIN, EXPIRY_SKEW_MAX)
    })
}

/// Classify an ended connection (brief §3.2).
pub(super) fn classify(end: &ConnEnd, at: &Context) -> Classified {
    use ErrorClass::*;
    let c = |class: ErrorClass, code: u32, msg: String| Classified {
        class,
        err: LastError::new(code, class, msg),
        kick: None,
        premature: false,
    };
    let said = |reason: &Option<String>| {
        reason
            .as_deref()
            .map(|r| format!(": {}", quote_external(r, MAX_REASON_CHARS)))
            .unwrap_or_default()
    };
    // The broker's own word, typed (the `im-error-code` user property): never parsed back out
    // of a reason string, which is only quoted in the message.
    let says_expired = |im_code: &Option<u32>| *im_code == Some(codes::SVR_SIG_EXPIRED);
    let at_end = at.at_end();
    match end {
        ConnEnd::Network {
            kind: NetKind::Closed | NetKind::Stalled,
            detail,
        } if at.closed_at_end() => c(
            SigExpired,
            codes::SVR_SIG_EXPIRED,
            format!(
                "the server closed the connection at the UserSig's expiry, without a \
                 DISCONNECT ({detail}); renewing the UserSig"
            ),
        ),
        ConnEnd::Network { kind, detail } => {
            let what = if at.online {
                "connection lost"
            } else {
                "could not connect"
            };
            c(Network, kind.code(), format!("{what}: {detail}"))
        }
        ConnEnd::Redirect {
            code,
            reference,
            reason,
            ..
        } => c(
            Busy,
            codes::NET_DISCONNECT,
            format!(
                "the broker sent us to another server (0x{code:02X}, {}{})",
                quote_external(reference, 80),
                said(reason)
            ),
        ),
        ConnEnd::CertNotYetValid { detail } => c(
            Clock,
            0,
            format!(
                "TLS says the server certificate is not valid yet ({detail}): the device \
                 clock is probably behind; waiting for time sync"
            ),
        ),
        ConnEnd::Refused {
            code,
            reason,
            im_code,
        } => {
            let r = said(reason);
            match *code {
                0x87 | 0x86 if at_end => c(
                    SigExpired,
                    codes::SVR_SIG_EXPIRED,
                    format!(
                        "the IM service refused the UserSig (CONNACK 0x{code:02X}{r}) at {}",
                        if at.expired_here() {
                            "its expiry"
                        } else {
                            "the edge of its expiry"
                        }
                    ),
                ),
                0x87 | 0x86 if says_expired(im_code) => Classified {
                    premature: true,
                    ..c(
                        SigExpired,
                        codes::SVR_SIG_EXPIRED,
                        format!(
                            "the IM service says the UserSig expired (CONNACK 0x{code:02X}{r})"
                        ),
                    )
                },
                0x87 | 0x86 => c(
                    SigRejected,
                    sig_code(im_code).unwrap_or(codes::SVR_SIG_CHECK_FAILED),
                    format!(
                        "the IM service refused the UserSig (CONNACK 0x{code:02X} {}{r})",
                        if *code == 0x87 {
                            "Not authorized"
                        } else {
                            "Bad user name or password"
                        }
                    ),
                ),
                0x8A => c(
                    Fatal,
                    codes::SVR_BANNED,
                    format!(
                        "the IM service says this account is banned (CONNACK 0x8A{r}); ask \
                         the app's administrator, then run `imlinkctl login`"
                    ),
                ),
                0x85 => c(
                    Fatal,
                    codes::INVALID_PARAMETERS,
                    format!(
                        "the IM service refused the MQTT client id (CONNACK 0x85{r}); check \
                         broker.client_id in the config"
                    ),
                ),
                0x84 | 0x8C => c(
                    Fatal,
                    codes::INVALID_PARAMETERS,
                    format!("the IM service does not accept this client (CONNACK 0x{code:02X}{r})"),
                ),
                0x9F => c(
                    Busy,
                    codes::SVR_FREQ_LIMIT,
                    format!(
                        "the IM service limits the login rate (CONNACK 0x9F{r}); retrying later"
                    ),
                ),
                0x81 | 0x82 | 0x90 | 0x95 | 0x99 | 0x9A | 0x9B => c(
                    Protocol,
                    codes::NET_DISCONNECT,
                    format!(
                        "the IM service refused the CONNECT as invalid (CONNACK 0x{code:02X}{r})"
                    ),
                ),
                _ => c(
                    Busy,
                    codes::NET_DISCONNECT,
                    format!(
                        "the IM service refused the connection for now (CONNACK 0x{code:02X}{r})"
                    ),
                ),
            }
        }
        ConnEnd::ServerDisconnect {
            code,
            reason,
            im_code,
        } => {
            let r = said(reason);
            match *code {
                0x8E => Classified {
                    kick: Some(KickReason::LoggedInElsewhere),
                    ..c(
                        Kicked,
                        codes::KICKED_OFF_BY_OTHER,
                        format!(
                            "logged in elsewhere: another login took the session (DISCONNECT 0x8E{r})"
                        ),
                    )
                },
                0x98 if at_end => c(
                    SigExpired,
                    codes::SVR_SIG_EXPIRED,
                    format!(
                        "the server ended the session at the UserSig's expiry (DISCONNECT 0x98 \
                         Administrative action{r}); renewing the UserSig"
                    ),
                ),
                0x98 => Classified {
                    kick: Some(KickReason::KickedByAdmin),
                    ..c(
                        Kicked,
                        codes::KICKED_OFF_BY_OTHER,
                        format!("kicked offline by an administrator (DISCONNECT 0x98{r})"),
                    )
                },
                0xA0 if im_code.is_none() || says_expired(im_code) || at_end => Classified {
                    premature: !at_end,
                    ..c(
                        SigExpired,
                        codes::SVR_SIG_EXPIRED,
                        format!("the UserSig expired while online (DISCONNECT 0xA0{r})"),
                    )
                },
                // Only our own clock decides: a session the server just accepted and then
                // ends as "not authorized" is a rejection (an ACL, a revoked account),
                // whatever it says, unless the sig is at its end (EMQX ≥ 5.7 sends 0x87 at
                // `expire_at`).
                0x87 | 0x86 if at_end => c(
                    SigExpired,
                    codes::SVR_SIG_EXPIRED,
                    format!(
                        "the IM service ended the session as the UserSig ran out (DISCONNECT 0x{code:02X}{r})"
                    ),
                ),
                0x87 | 0x86 => c(
                    SigRejected,
                    sig_code(im_code).unwrap_or(codes::SVR_SIG_CHECK_FAILED),
                    format!("the IM service revoked the UserSig (DISCONNECT 0x{code:02X}{r})"),
                ),
                0x89 | 0x8B | 0x96 | 0x97 => c(
                    Busy,
                    codes::NET_DISCONNECT,
                    format!("the server is busy or shutting down (DISCONNECT 0x{code:02X}{r})"),
                ),
                0x81 | 0x82 | 0x8C | 0x8F | 0x90 | 0x93 | 0x94 | 0x95 | 0x99 | 0x9A | 0x9B
                | 0x9E | 0xA1 | 0xA2 => c(
                    Protocol,
                    codes::NET_DISCONNECT,
                    format!(
                        "the server ended the session for a reason a reconnect does not fix \
                         (DISCONNECT 0x{code:02X}{r})"
                    ),
                ),
                _ => c(
                    Network,
                    codes::NET_DISCONNECT,
                    format!("the server ended the session (DISCONNECT 0x{code:02X}{r})"),
                ),
            }
        }
    }
}

/// The broker's IM code when it is one of the UserSig codes (70xxx: 70009 signature mismatch,
/// 70013 another UserID, …), to report instead of the generic 70003.
fn sig_code(im_code: &Option<u32>) -> Option<u32> {
    im_code.filter(|c| (70000..80000).contains(c))
}
