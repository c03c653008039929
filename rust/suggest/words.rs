//! How alike two skeletons' names are: shared words, a few well-known synonyms of the field
//! (`bn` / `norm`, `downsample` / `shortcut`, ...) and shared prefixes (`embed` /
//! `embedding`). Names only break ties between candidates that shapes and structure fit
//! equally well; they never make a mapping on their own.

/// Groups of words that codebases use for the same thing.
const SYNONYMS: &[&[&str]] = &[
    &[
        "bn",
        "norm",
        "ln",
        "gn",
        "batchnorm",
        "layernorm",
        "groupnorm",
    ],
    &["downsample", "shortcut", "skip", "residual"],
    &["fc", "linear", "dense", "lin"],
    &["attn", "attention", "att"],
    &[
        "layer", "layers", "block", "blocks", "stage", "stages", "res",
    ],
    &["head", "heads", "classifier", "logits"],
    &["embed", "embedding", "embeddings", "emb", "embeds"],
    &["pos", "position", "positional"],
    &["cls", "class"],
    &["conv", "convolution"],
    &["weight", "gamma", "kernel", "scale"],
    &["bias", "beta"],
    &["proj", "projection"],
    &["mlp", "ffn", "feedforward"],
    &["stem", "patch"],
];

/// Points for an exact word, and for a synonym or prefix.
const EXACT: u32 = 3;
const FUZZY: u32 = 2;

fn synonyms(a: &str, b: &str) -> bool {
    SYNONYMS
        .iter()
        .any(|group| group.contains(&a) && group.contains(&b))
}

fn prefix_of(a: &str, b: &str) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    short.len() >= 3 && long.starts_with(short)
}

/// How alike the word lists `a` and `b` are: for each distinct word of `a`, the points of its
/// best counterpart in `b`. The last word (the tensor's own name) counts double.
pub fn similarity(a: &[String], b: &[String]) -> u32 {
    let mut seen: Vec<&str> = Vec::with_capacity(a.len());
    let mut total = 0;
    for (i, w) in a.iter().enumerate() {
        if seen.contains(&w.as_str()) {
            continue;
        }
        seen.push(w);
        let best = b
            .iter()
            .map(|v| {
                if v == w {
                    EXACT
                } else if synonyms(w, v) || prefix_of(w, v) {
                    FUZZY
                } else {
                    0
                }
            })
            .max()
            .unwrap_or(0);
        let leaf = i + 1 == a.len() && b.last() == Some(w);
        total += if leaf { best * 2 } else { best };
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split(' ').map(String::from).collect()
    }

    #[test]
    fn exact_beats_fuzzy_beats_nothing() {
        let a = words("blocks attn proj bias");
        let out_proj = words("encoder layers self attention out proj bias");
        let ln = words("encoder layers ln bias");
        assert!(similarity(&a, &out_proj) > similarity(&a, &ln));
        assert!(similarity(&words("norm weight"), &words("ln weight")) > 0);
        assert!(
            similarity(&words("norm weight"), &words("ln weight"))
                > similarity(&words("norm weight"), &words("ln bias"))
        );
        assert_eq!(similarity(&words("foo"), &words("bar")), 0);
        assert_eq!(similarity(&[], &words("bar")), 0);
    }

    #[test]
    fn prefixes_need_three_letters() {
        assert!(prefix_of("embed", "embedding"));
        assert!(!prefix_of("a", "attn"));
    }
}
