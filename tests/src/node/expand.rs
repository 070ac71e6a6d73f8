//! `$(VAR)` expansion in a container's env, command and args, as the kubelet does it
//! (k8s.io/kubernetes/third_party/forked/golang/expansion): `$(NAME)` becomes the variable's
//! value, an unknown name stays as written, `$$` is an escaped `$`, anything else is literal.

/// Expands `input` with `lookup` (which returns `None` for unknown names).
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let mut chars = after.chars();
        match chars.next() {
            // A trailing `$` is literal.
            None => {
                out.push('$');
                rest = after;
            }
            Some('$') => {
                out.push('$');
                rest = &after[1..];
            }
            Some('(') => match after.find(')') {
                Some(close) => {
                    let name = &after[1..close];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &after[close + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = &after[1..];
                }
            },
            Some(c) => {
                out.push('$');
                out.push(c);
                rest = &after[c.len_utf8()..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "POD_IP" => Some("10.244.1.2".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_like_the_kubelet() {
        let cases = [
            ("$(POD_IP):8080", "10.244.1.2:8080"),
            ("--addr=$(POD_IP)", "--addr=10.244.1.2"),
            ("$(UNKNOWN)", "$(UNKNOWN)"),
            ("$$(POD_IP)", "$(POD_IP)"),
            ("$$$(POD_IP)", "$10.244.1.2"),
            ("a$(EMPTY)b", "ab"),
            ("$(POD_IP", "$(POD_IP"),
            ("cost $5", "cost $5"),
            ("end$", "end$"),
            ("$é", "$é"),
            ("$(POD_IP)$(POD_IP)", "10.244.1.210.244.1.2"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, env), want, "{input:?}");
        }
    }
}
