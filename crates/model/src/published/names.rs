//! Parameter names of the published layouts, mapped to the HuggingFace names this crate's
//! modules carry.

/// Where one tensor of a published checkpoint goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An encoder parameter, by its HF `HubertModel` name.
    Encoder(String),
    /// A fairseq pretraining-head parameter (`final_proj.weight`, `final_proj.bias`,
    /// `label_embs_concat`), by its name in [`crate::HubertForPretraining`].
    Head(String),
    /// Not part of the encoder or the pretraining head (a fine-tuning head), left out.
    Ignored,
}

/// The naming scheme of a state dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// fairseq `HubertModel` (also what s3prl's converted upstreams keep).
    Fairseq,
    /// torchaudio `Wav2Vec2Model` / `HuBERTPretrainModel`.
    Torchaudio,
}

impl Naming {
    /// The scheme a set of keys is written in, from names only one of them uses.
    pub fn detect<'a>(mut keys: impl Iterator<Item = &'a str>) -> Option<Self> {
        keys.find_map(|k| {
            let k = k.strip_prefix("wav2vec2.").unwrap_or(k);
            if k.starts_with("encoder.transformer.") || k.starts_with("encoder.feature_projection.")
            {
                Some(Self::Torchaudio)
            } else if k.starts_with("encoder.pos_conv.")
                || k.starts_with("post_extract_proj.")
                || k.contains(".self_attn.")
            {
                Some(Self::Fairseq)
            } else {
                None
            }
        })
    }

    /// The HF target of `key`, or `None` for a key this scheme does not have.
    pub fn map(self, key: &str) -> Option<Target> {
        match self {
            Self::Fairseq => fairseq(key),
            Self::Torchaudio => torchaudio(key),
        }
    }
}

/// The weight-norm halves of the positional convolution: the old `torch.nn.utils.weight_norm`
/// names and the parametrization names current torch (and transformers) use.
fn weight_norm(rest: &str) -> Option<&'static str> {
    match rest {
        "weight_g" | "parametrizations.weight.original0" => {
            Some("parametrizations.weight.original0")
        }
        "weight_v" | "parametrizations.weight.original1" => {
            Some("parametrizations.weight.original1")
        }
        "bias" => Some("bias"),
        _ => None,
    }
}

/// fairseq `HubertModel` names (fairseq 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99,
/// fairseq/models/hubert/hubert.py:L248; the encoder of fairseq/models/wav2vec/wav2vec2.py),
/// mapped as transformers' converter does (transformers v5.23.0,
/// src/transformers/models/hubert/convert_hubert_original_pytorch_checkpoint_to_pytorch.py:L37
/// `MAPPING`).
fn fairseq(key: &str) -> Option<Target> {
    let enc = |s: String| Some(Target::Encoder(s));
    match key {
        "mask_emb" => return enc("masked_spec_embed".into()),
        "label_embs_concat" => return Some(Target::Head(key.into())),
        "final_proj.weight" | "final_proj.bias" => return Some(Target::Head(key.into())),
        _ => {}
    }
    if let Some(rest) = key.strip_prefix("layer_norm.") {
        return enc(format!("feature_projection.layer_norm.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("post_extract_proj.") {
        return enc(format!("feature_projection.projection.{rest}"));
    }
    if let Some(rest) = key.strip_prefix("feature_extractor.conv_layers.") {
        let (i, part) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let module = match part {
            // nn.Sequential(conv, dropout, norm, GELU): the norm is a GroupNorm (`2`) or a
            // Sequential(TransposeLast, Fp32LayerNorm, TransposeLast) (`2.1`).
            "0.weight" | "0.bias" => format!("conv.{}", &part[2..]),
            "2.weight" | "2.bias" => format!("layer_norm.{}", &part[2..]),
            "2.1.weight" | "2.1.bias" => format!("layer_norm.{}", &part[4..]),
            _ => return None,
        };
        return enc(format!("feature_extractor.conv_layers.{i}.{module}"));
    }
    if let Some(rest) = key.strip_prefix("encoder.pos_conv.0.") {
        return enc(format!(
            "encoder.pos_conv_embed.conv.{}",
            weight_norm(rest)?
        ));
    }
    if let Some(rest) = key.strip_prefix("encoder.layer_norm.") {
        return enc(format!("encoder.layer_norm.{rest}"));
    }
    let rest = key.strip_prefix("encoder.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    if !matches!(param, "weight" | "bias") {
        return None;
    }
    let module = match module {
        "self_attn.q_proj" => "attention.q_proj",
        "self_attn.k_proj" => "attention.k_proj",
        "self_attn.v_proj" => "attention.v_proj",
        "self_attn.out_proj" => "attention.out_proj",
        "self_attn_layer_norm" => "layer_norm",
        "fc1" => "feed_forward.intermediate_dense",
        "fc2" => "feed_forward.output_dense",
        "final_layer_norm" => "final_layer_norm",
        _ => return None,
    };
    enc(format!("encoder.layers.{n}.{module}.{param}"))
}

/// torchaudio names (torchaudio 2.11, torchaudio/models/wav2vec2/model.py `Wav2Vec2Model`,
/// `HuBERTPretrainModel`; components.py): the HF names under other prefixes, the pretraining
/// model's encoder under `wav2vec2.`.
fn torchaudio(key: &str) -> Option<Target> {
    let enc = |s: String| Some(Target::Encoder(s));
    match key {
        "mask_generator.mask_embedding" => return enc("masked_spec_embed".into()),
        "logit_generator.label_embeddings" => {
            return Some(Target::Head("label_embs_concat".into()));
        }
        _ => {}
    }
    if let Some(rest) = key.strip_prefix("logit_generator.final_proj.") {
        return matches!(rest, "weight" | "bias")
            .then(|| Target::Head(format!("final_proj.{rest}")));
    }
    let key = key.strip_prefix("wav2vec2.").unwrap_or(key);
    // `aux`: the linear CTC head of a fine-tuned `Wav2Vec2Model`.
    if key.starts_with("aux.") {
        return Some(Target::Ignored);
    }
    if let Some(rest) = key.strip_prefix("feature_extractor.conv_layers.") {
        let (i, part) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        return matches!(
            part,
            "conv.weight" | "conv.bias" | "layer_norm.weight" | "layer_norm.bias"
        )
        .then(|| Target::Encoder(format!("feature_extractor.conv_layers.{i}.{part}")));
    }
    if let Some(rest) = key.strip_prefix("encoder.feature_projection.") {
        return matches!(
            rest,
            "layer_norm.weight" | "layer_norm.bias" | "projection.weight" | "projection.bias"
        )
        .then(|| Target::Encoder(format!("feature_projection.{rest}")));
    }
    if let Some(rest) = key.strip_prefix("encoder.transformer.pos_conv_embed.conv.") {
        return enc(format!(
            "encoder.pos_conv_embed.conv.{}",
            weight_norm(rest)?
        ));
    }
    if let Some(rest) = key.strip_prefix("encoder.transformer.layer_norm.") {
        return enc(format!("encoder.layer_norm.{rest}"));
    }
    let rest = key.strip_prefix("encoder.transformer.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let known = matches!(
        module,
        "attention.q_proj"
            | "attention.k_proj"
            | "attention.v_proj"
            | "attention.out_proj"
            | "layer_norm"
            | "feed_forward.intermediate_dense"
            | "feed_forward.output_dense"
            | "final_layer_norm"
    );
    (known && matches!(param, "weight" | "bias"))
        .then(|| Target::Encoder(format!("encoder.layers.{n}.{module}.{param}")))
}

/// fairseq's `conv_feature_layers`, a Python expression of `(dim, kernel, stride)` tuples:
/// `"[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"`. fairseq `eval`s it
/// (fairseq/models/wav2vec/wav2vec2.py:L312); here only that grammar is read: lists of
/// integer triples, joined by `+`, each optionally repeated by `* n`.
pub fn parse_conv_layers(spec: &str) -> Result<Vec<(usize, usize, usize)>, String> {
    let mut p = ConvSpec {
        s: spec.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        let list = p.list()?;
        let times = if p.eat(b'*') { p.int()? } else { 1 };
        if list.len().saturating_mul(times) + out.len() > 64 {
            return Err("more than 64 conv layers".into());
        }
        for _ in 0..times {
            out.extend_from_slice(&list);
        }
        if !p.eat(b'+') {
            break;
        }
    }
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(format!("unexpected text at character {}", p.i + 1));
    }
    if out.is_empty() {
        return Err("no layers".into());
    }
    Ok(out)
}

struct ConvSpec<'a> {
    s: &'a [u8],
    i: usize,
}

impl ConvSpec<'_> {
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        let hit = self.s.get(self.i) == Some(&c);
        self.i += usize::from(hit);
        hit
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "expected `{}` at character {}",
                c as char,
                self.i + 1
            ))
        }
    }
    fn int(&mut self) -> Result<usize, String> {
        self.skip_ws();
        let start = self.i;
        while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[start..self.i])
            .ok()
            .and_then(|t| t.parse().ok())
            .filter(|&n| n > 0 && n <= 1 << 20)
            .ok_or_else(|| format!("expected a positive integer at character {}", start + 1))
    }
    fn list(&mut self) -> Result<Vec<(usize, usize, usize)>, String> {
        self.expect(b'[')?;
        let mut out = Vec::new();
        while !self.eat(b']') {
            if !out.is_empty() {
                self.expect(b',')?;
                if self.eat(b']') {
                    break;
                }
            }
            self.expect(b'(')?;
            let dim = self.int()?;
            self.expect(b',')?;
            let kernel = self.int()?;
            self.expect(b',')?;
            let stride = self.int()?;
            self.eat(b',');
            self.expect(b')')?;
            out.push((dim, kernel, stride));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fairseq_base_spec_parses() {
        let layers = parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2").unwrap();
        assert_eq!(layers.len(), 7);
        assert_eq!(layers[0], (512, 10, 5));
        assert_eq!(layers[4], (512, 3, 2));
        assert_eq!(layers[6], (512, 2, 2));
        assert_eq!(
            parse_conv_layers("[(32, 10, 5), (32, 3, 2),]").unwrap(),
            vec![(32, 10, 5), (32, 3, 2)]
        );
        for bad in [
            "",
            "[(512,10)]",
            "__import__('os')",
            "[(512,10,5)] * 100",
            "[(0,1,1)]",
        ] {
            assert!(parse_conv_layers(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn both_schemes_reach_the_hf_names() {
        let f = Naming::Fairseq;
        assert_eq!(
            f.map("encoder.layers.3.self_attn.q_proj.weight"),
            Some(Target::Encoder(
                "encoder.layers.3.attention.q_proj.weight".into()
            ))
        );
        assert_eq!(
            f.map("feature_extractor.conv_layers.2.2.1.bias"),
            Some(Target::Encoder(
                "feature_extractor.conv_layers.2.layer_norm.bias".into()
            ))
        );
        assert_eq!(
            f.map("encoder.pos_conv.0.weight_g"),
            Some(Target::Encoder(
                "encoder.pos_conv_embed.conv.parametrizations.weight.original0".into()
            ))
        );
        assert_eq!(f.map("encoder.layers.0.self_attn.bogus"), None);
        let t = Naming::Torchaudio;
        assert_eq!(
            t.map("wav2vec2.encoder.transformer.layers.1.feed_forward.output_dense.bias"),
            Some(Target::Encoder(
                "encoder.layers.1.feed_forward.output_dense.bias".into()
            ))
        );
        assert_eq!(
            t.map("logit_generator.label_embeddings"),
            Some(Target::Head("label_embs_concat".into()))
        );
        assert_eq!(t.map("aux.weight"), Some(Target::Ignored));
        assert_eq!(
            Naming::detect(["mask_emb", "encoder.pos_conv.0.bias"].into_iter()),
            Some(Naming::Fairseq)
        );
        assert_eq!(
            Naming::detect(["wav2vec2.encoder.transformer.layer_norm.bias"].into_iter()),
            Some(Naming::Torchaudio)
        );
    }
}
