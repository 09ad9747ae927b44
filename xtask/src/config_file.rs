//! Editing the worker's configuration as the lab keeps it: `.lab/config.toml` (local driver)
//! and the ConfigMap in manifests/configmap.yaml (which embeds the same TOML, indented).
//! Line-based on purpose: the ConfigMap's TOML is inside YAML, and the rest of each file must
//! stay byte for byte as it was.

use anyhow::bail;

/// Replaces the value of `max_leases_cap` in a config.toml (or a ConfigMap holding one).
pub fn replace_cap(text: &str, cap: u64) -> anyhow::Result<String> {
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("max_leases_cap") && trimmed.contains('=') {
                found = true;
                let indent = &line[..line.len() - trimmed.len()];
                format!("{indent}max_leases_cap = {cap}")
            } else {
                line.to_owned()
            }
        })
        .collect();
    if !found {
        bail!("no `max_leases_cap = …` line to change");
    }
    Ok(out.join("\n") + "\n")
}

pub fn read_cap(text: &str) -> Option<u64> {
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("max_leases_cap"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_is_replaced_in_place() {
        let cm = "data:\n  config.toml: |\n    stream_name = \"s\"\n    max_leases_cap = 80\n";
        let out = replace_cap(cm, 100).unwrap();
        assert!(out.contains("    max_leases_cap = 100\n"));
        assert_eq!(read_cap(&out), Some(100));
        assert!(replace_cap("stream_name = \"s\"\n", 5).is_err());
    }
}
