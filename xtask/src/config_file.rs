//! Editing the worker's configuration as the lab keeps it: `.lab/config.toml` (local driver)
//! and the ConfigMap in manifests/configmap.yaml, which embeds the same TOML as an indented
//! block scalar (`config.toml: |`). The TOML is parsed and edited with `toml_edit`, so
//! comments, key order and every other line stay as they were; the YAML around the block is
//! not touched at all.

use anyhow::{Context, bail};
use toml_edit::{DocumentMut, value};

/// The key `scenario config-change` edits.
const CAP_KEY: &str = "max_leases_cap";
/// The ConfigMap key whose value is the worker's config.toml.
const CONFIGMAP_KEY: &str = "config.toml: |";

/// Where the TOML sits in a text: the whole text, or a ConfigMap's indented block.
struct Embedded<'a> {
    before: &'a str,
    toml: String,
    indent: String,
    after: &'a str,
}

fn locate(text: &str) -> anyhow::Result<Embedded<'_>> {
    let Some(key_at) = text.find(CONFIGMAP_KEY) else {
        return Ok(Embedded {
            before: "",
            toml: text.to_owned(),
            indent: String::new(),
            after: "",
        });
    };
    let line_start = text[..key_at].rfind('\n').map_or(0, |i| i + 1);
    let key_indent = key_at - line_start;
    let body_start = text[key_at..]
        .find('\n')
        .map(|i| key_at + i + 1)
        .context("the ConfigMap's `config.toml: |` has no body")?;
    // The block runs while lines are blank or indented deeper than the key.
    let mut end = body_start;
    let mut indent: Option<String> = None;
    for line in text[body_start..].split_inclusive('\n') {
        let content = line.trim_end_matches(['\n', '\r']);
        let depth = content.len() - content.trim_start().len();
        if !content.trim().is_empty() {
            if depth <= key_indent {
                break;
            }
            indent.get_or_insert_with(|| content[..depth].to_owned());
        }
        end += line.len();
    }
    let indent = indent.context("the ConfigMap's `config.toml: |` is empty")?;
    let toml = text[body_start..end]
        .split_inclusive('\n')
        .map(|l| {
            l.strip_prefix(indent.as_str())
                // A blank line may carry less indentation (or none): keep only its newline.
                .unwrap_or(if l.ends_with('\n') { "\n" } else { "" })
        })
        .collect();
    Ok(Embedded {
        before: &text[..body_start],
        toml,
        indent,
        after: &text[end..],
    })
}

fn parse(toml: &str) -> anyhow::Result<DocumentMut> {
    toml.parse::<DocumentMut>()
        .context("the worker's config.toml is not valid TOML")
}

/// Sets `max_leases_cap` in a config.toml (or a ConfigMap holding one); everything else stays
/// as it was. A file without the key is an error: the lab always writes it, so its absence
/// means the wrong file.
pub fn replace_cap(text: &str, cap: u64) -> anyhow::Result<String> {
    let place = locate(text)?;
    let mut doc = parse(&place.toml)?;
    let Some(item) = doc.get_mut(CAP_KEY) else {
        bail!("no `{CAP_KEY}` key to change");
    };
    let cap = i64::try_from(cap).context("the cap does not fit in a TOML integer")?;
    // Keep the key's own decoration (a trailing comment, say).
    let decor = item.as_value().map(|v| v.decor().clone());
    *item = value(cap);
    if let (Some(decor), Some(v)) = (decor, item.as_value_mut()) {
        *v.decor_mut() = decor;
    }
    let edited = doc.to_string();
    let body: String = edited
        .split_inclusive('\n')
        .map(|l| {
            if l.trim().is_empty() {
                l.to_owned()
            } else {
                format!("{}{l}", place.indent)
            }
        })
        .collect();
    Ok(format!("{}{body}{}", place.before, place.after))
}

/// The `max_leases_cap` a config.toml (or a ConfigMap holding one) sets; `None` when it sets
/// none (the worker's default applies) or the text is not TOML.
pub fn read_cap(text: &str) -> Option<u64> {
    let doc = parse(&locate(text).ok()?.toml).ok()?;
    doc.get(CAP_KEY)?
        .as_integer()
        .and_then(|v| u64::try_from(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIGMAP: &str = "\
apiVersion: v1
kind: ConfigMap
data:
  config.toml: |
    # the stream
    stream_name = \"s\"
    max_leases_cap = 80 # the users' cap

    idle_poll_max = \"5s\"
metadata:
  name: kds-worker-config
";

    #[test]
    fn the_cap_is_replaced_in_a_configmap_and_nothing_else_changes() {
        let out = replace_cap(CONFIGMAP, 100).unwrap();
        assert_eq!(
            out,
            CONFIGMAP.replace("max_leases_cap = 80 #", "max_leases_cap = 100 #")
        );
        assert_eq!(read_cap(&out), Some(100));
        assert_eq!(read_cap(CONFIGMAP), Some(80));
    }

    #[test]
    fn the_cap_is_replaced_in_a_plain_config() {
        let text = "app_name = \"a\"\nmax_leases_cap = 80\nlog_format = \"json\"\n";
        let out = replace_cap(text, 7).unwrap();
        assert_eq!(out, text.replace("= 80", "= 7"));
    }

    #[test]
    fn the_repository_configmap_can_be_edited() {
        let path = crate::util::project_root().join("manifests/configmap.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let out = replace_cap(&text, 12).unwrap();
        assert_eq!(read_cap(&out), Some(12));
        assert_eq!(out.lines().count(), text.lines().count());
    }

    #[test]
    fn a_missing_key_or_broken_toml_is_an_error_naming_it() {
        let err = replace_cap("stream_name = \"s\"\n", 5).unwrap_err();
        assert!(err.to_string().contains("max_leases_cap"), "{err}");
        let err = replace_cap("max_leases_cap = = 3\n", 5).unwrap_err();
        assert!(err.to_string().contains("not valid TOML"), "{err}");
        assert_eq!(read_cap("max_leases_cap = \"eighty\"\n"), None);
        assert_eq!(read_cap("stream_name = \"s\"\n"), None);
    }
}
