//! Chat templates: the Jinja template a model ships (GGUF
//! `tokenizer.chat_template`, Hugging Face `tokenizer_config.json`'s
//! `chat_template`), rendered as transformers' `apply_chat_template` renders
//! it: Jinja2 with `trim_blocks` and `lstrip_blocks`, loop controls,
//! Python's string and dict methods, `raise_exception`, and the variables
//! `messages`, `add_generation_prompt` and the special tokens' text. The
//! tests check the output against Jinja2 itself.

use anyhow::{anyhow, Result};
use minijinja::{Environment, Error, ErrorKind};

/// The special tokens' text a template may name.
#[derive(Default, Clone)]
pub struct Specials {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

/// The conversation `messages` (role, content) in `template`, with the
/// assistant's turn opened when `add_generation_prompt`.
pub fn render(
    template: &str,
    messages: &[(String, String)],
    specials: &Specials,
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters"),
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    // transformers' helper: the current date (UTC here), strftime-style.
    env.add_function("strftime_now", |fmt: String| -> Result<String, Error> {
        strftime_now(&fmt)
    });
    env.add_template("chat", template)
        .map_err(|e| anyhow!("the chat template does not parse: {e:#}"))?;
    let messages: Vec<minijinja::Value> = messages
        .iter()
        .map(|(role, content)| {
            minijinja::Value::from(std::collections::BTreeMap::from([
                ("role".to_string(), role.clone()),
                ("content".to_string(), content.clone()),
            ]))
        })
        .collect();
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => specials.bos_token.as_deref().unwrap_or(""),
        eos_token => specials.eos_token.as_deref().unwrap_or(""),
        unk_token => specials.unk_token.as_deref().unwrap_or(""),
        pad_token => specials.pad_token.as_deref().unwrap_or(""),
        // transformers passes these as None when a request has none.
        tools => minijinja::Value::from(()),
        documents => minijinja::Value::from(()),
    };
    env.get_template("chat")
        .expect("added above")
        .render(ctx)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => anyhow!(
                "the chat template refuses: {}",
                e.detail().unwrap_or("no reason given")
            ),
            _ => anyhow!("the chat template fails: {e:#}"),
        })
}

/// The current UTC time formatted with `%d %m %Y %y %b %B %a %A %H %M %S
/// %j %%` (what chat templates use: Llama 3.2's "26 Jul 2024").
fn strftime_now(fmt: &str) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(secs, fmt)
}

fn strftime(secs: i64, fmt: &str) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(m - 1) as usize];
    let yday = before + d + (leap && m > 2) as i64;
    let month = MONTHS[(m - 1) as usize];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out += &format!("{d:02}"),
            Some('m') => out += &format!("{m:02}"),
            Some('Y') => out += &y.to_string(),
            Some('y') => out += &format!("{:02}", y.rem_euclid(100)),
            Some('b') => out += &month[..3],
            Some('B') => out += month,
            Some('a') => out += &weekday[..3],
            Some('A') => out += weekday,
            Some('H') => out += &format!("{:02}", tod / 3600),
            Some('M') => out += &format!("{:02}", tod / 60 % 60),
            Some('S') => out += &format!("{:02}", tod % 60),
            Some('j') => out += &format!("{yday:03}"),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: %{} is not supported",
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_trimmed_blocks_python_methods_and_refusals() {
        let t = "{% for m in messages %}\n  {{ bos_token }}{{ m['role'].upper() }}: {{ m.content.strip() }}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}";
        let msgs = vec![("user".to_string(), "  hi ".to_string())];
        let s = Specials {
            bos_token: Some("<s>".into()),
            ..Default::default()
        };
        assert_eq!(render(t, &msgs, &s, true).unwrap(), "  <s>USER: hi\nA:");
        assert_eq!(render(t, &msgs, &s, false).unwrap(), "  <s>USER: hi\n");
        let refuse = "{{ raise_exception('only user turns') }}";
        let e = render(refuse, &msgs, &s, true).unwrap_err().to_string();
        assert!(e.contains("only user turns"), "{e}");
        assert!(render("{% for %}", &msgs, &s, true).is_err());
        // Variables transformers passes as None, and the date helper.
        let t = "{% if tools is not none %}T{% endif %}{% if documents is none %}D{% endif %}";
        assert_eq!(render(t, &msgs, &s, true).unwrap(), "D");
        let today = render("{{ strftime_now('%d %b %Y') }}", &msgs, &s, true).unwrap();
        assert_eq!(today.len(), 11, "{today}");
    }

    #[test]
    fn strftime_gives_civil_dates() {
        // 2024-07-26 12:34:56 UTC, a Friday (Llama 3.1's default date).
        assert_eq!(
            strftime(1_721_997_296, "%d %b %Y, %A %H:%M:%S, day %j, %B %m/%y %%").unwrap(),
            "26 Jul 2024, Friday 12:34:56, day 208, July 07/24 %"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %a").unwrap(), "1970-01-01 Thu");
        assert_eq!(strftime(951_782_400, "%Y-%m-%d").unwrap(), "2000-02-29");
        assert!(strftime(0, "%Q").is_err());
    }
}
