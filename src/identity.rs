//! Who the daemon logs in as: the UserID rule of the IM SDK and the MQTT client id template.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest UserID the IM service accepts, in bytes.
pub const MAX_USER_ID_LEN: usize = 32;

/// A UserID that satisfies the IM rule: 1–32 bytes of `[A-Za-z0-9_-]`. Constructing one is the
/// validation, so a `UserId` anywhere in the code is known good (error 7003 otherwise).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

/// Why a string is not a UserID. IM error 7003 (ERR_SDK_COMM_INVALID_IDENTIFIER).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUserId {
    #[error("the UserID is empty")]
    Empty,
    #[error("the UserID is {0} bytes long; at most {MAX_USER_ID_LEN} are allowed")]
    TooLong(usize),
    #[error(
        "the UserID has a character other than A-Z a-z 0-9 _ - at byte {0} (IM rule; error 7003)"
    )]
    BadChar(usize),
}

impl InvalidUserId {
    /// ERR_SDK_COMM_INVALID_IDENTIFIER.
    pub const CODE: u32 = 7003;
}

impl UserId {
    pub fn parse(s: &str) -> Result<UserId, InvalidUserId> {
        if s.is_empty() {
            return Err(InvalidUserId::Empty);
        }
        if s.len() > MAX_USER_ID_LEN {
            return Err(InvalidUserId::TooLong(s.len()));
        }
        if let Some(i) = s
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        {
            return Err(InvalidUserId::BadChar(i));
        }
        Ok(UserId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = InvalidUserId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        UserId::parse(&s)
    }
}

impl From<UserId> for String {
    fn from(u: UserId) -> String {
        u.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// The placeholders a client id (and the provisioning URL) template may use.
pub const PLACEHOLDERS: [&str; 4] = ["sdk_app_id", "user_id", "platform", "instance"];

/// The values a template is filled with.
pub struct TemplateValues<'a> {
    pub sdk_app_id: u64,
    pub user_id: &'a UserId,
    pub platform: &'a str,
    pub instance: &'a str,
}

/// A `{placeholder}` template, checked at config time: only known placeholders, balanced
/// braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "unknown placeholder {{{0}}} (known: {{sdk_app_id}} {{user_id}} {{platform}} {{instance}})"
    )]
    Unknown(String),
    #[error("unbalanced braces")]
    Unbalanced,
    #[error("it must contain {{{0}}}")]
    Missing(&'static str),
}

impl Template {
    /// Parse a template that must mention each of `required`.
    pub fn parse(s: &str, required: &[&'static str]) -> Result<Template, TemplateError> {
        let mut rest = s;
        let mut seen = Vec::new();
        while let Some(open) = rest.find('{') {
            if rest[..open].contains('}') {
                return Err(TemplateError::Unbalanced);
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or(TemplateError::Unbalanced)?;
            let name = &after[..close];
            if !PLACEHOLDERS.contains(&name) {
                return Err(TemplateError::Unknown(name.to_string()));
            }
            seen.push(name.to_string());
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(TemplateError::Unbalanced);
        }
        if let Some(missing) = required.iter().find(|r| !seen.iter().any(|s| s == *r)) {
            return Err(TemplateError::Missing(missing));
        }
        Ok(Template(s.to_string()))
    }

    /// Fill the template; `escape` is applied to each value (e.g. URL encoding).
    pub fn render(&self, v: &TemplateValues<'_>, escape: impl Fn(&str) -> String) -> String {
        self.0
            .replace("{sdk_app_id}", &v.sdk_app_id.to_string())
            .replace("{user_id}", &escape(v.user_id.as_str()))
            .replace("{platform}", &escape(v.platform))
            .replace("{instance}", &escape(v.instance))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_rule_is_the_sdk_rule() {
        assert!(UserId::parse("kiosk-0042").is_ok());
        assert!(UserId::parse("A_b-9").is_ok());
        assert!(UserId::parse(&"x".repeat(32)).is_ok());
        assert_eq!(UserId::parse(""), Err(InvalidUserId::Empty));
        assert_eq!(
            UserId::parse(&"x".repeat(33)),
            Err(InvalidUserId::TooLong(33))
        );
        assert_eq!(UserId::parse("a b"), Err(InvalidUserId::BadChar(1)));
        assert_eq!(UserId::parse("ä"), Err(InvalidUserId::BadChar(0)));
        assert_eq!(UserId::parse("a/b"), Err(InvalidUserId::BadChar(1)));
        assert_eq!(UserId::parse("a.b"), Err(InvalidUserId::BadChar(1)));
        // Deserialising validates too.
        assert!(serde_json::from_str::<UserId>("\"a:b\"").is_err());
    }

    #[test]
    fn templates_know_their_placeholders() {
        let t =
            Template::parse("{sdk_app_id}:{user_id}:{platform}:{instance}", &["user_id"]).unwrap();
        let user = UserId::parse("alice").unwrap();
        let v = TemplateValues {
            sdk_app_id: 7,
            user_id: &user,
            platform: "linux",
            instance: "0",
        };
        assert_eq!(t.render(&v, str::to_string), "7:alice:linux:0");
        assert_eq!(
            Template::parse("{user}", &[]),
            Err(TemplateError::Unknown("user".into()))
        );
        assert_eq!(
            Template::parse("{user_id", &[]),
            Err(TemplateError::Unbalanced)
        );
        assert_eq!(Template::parse("a}b", &[]), Err(TemplateError::Unbalanced));
        assert_eq!(
            Template::parse("static", &["user_id"]),
            Err(TemplateError::Missing("user_id"))
        );
    }
}
