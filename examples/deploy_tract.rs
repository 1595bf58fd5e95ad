//! Classify one image with an elrt `compact.onnx` in tract, preprocessing it as training did.
//!
//!     cargo run --release --example deploy_tract -- compact.onnx image.png
//!
//! Prints the top-5 classes, one per line: probability (softmax of the logits), then name.
//! Everything the preprocessing needs is read from the file's `metadata_props`, so this program
//! works for any file `elrt export` wrote. It uses only public crates (tract-onnx, image,
//! serde_json, anyhow), not elrt, so it can be copied into an application as it is.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use image::imageops::FilterType;
use tract_onnx::prelude::*;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model_path, image_path] = args.as_slice() else {
        bail!("usage: deploy_tract MODEL.onnx IMAGE");
    };

    // What the file says about its input (see the README, "Use the compact file").
    let proto = tract_onnx::onnx().proto_model_for_path(model_path)?;
    let meta: HashMap<&str, &str> = (proto.metadata_props.iter())
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    let get = |k: &str| {
        meta.get(k)
            .ok_or_else(|| anyhow!("{model_path}: no metadata {k} (not written by elrt export?)"))
    };
    let floats = |k: &str| -> Result<Vec<f32>> {
        get(k)?.split(',').map(|v| Ok(v.trim().parse()?)).collect()
    };
    // elrt.export.input_shape is "1,C,H,W" or "N,C,H,W" (elrt.input.layout: NCHW); run batch 1.
    let chw: Vec<usize> = (get("elrt.export.input_shape")?.split(',').skip(1))
        .map(|d| d.parse())
        .collect::<Result<_, _>>()?;
    let [c, h, w] = chw[..] else {
        bail!("{model_path}: input shape is not N,C,H,W")
    };
    let (mean, std) = (
        floats("elrt.normalize.mean")?,
        floats("elrt.normalize.std")?,
    );
    let classes: Vec<String> = match meta.get("elrt.classes") {
        Some(json) => serde_json::from_str(json)?,
        None => Vec::new(), // trained on a data set without names: print indices
    };

    // elrt.input.resize: decode as RGB, bilinear resize to H x W (aspect ratio not kept). The
    // image crate's Triangle filter is the one elrt trained with.
    if let Some(rule) = meta.get("elrt.input.resize") {
        eprintln!("input: {rule}");
    }
    let img = image::ImageReader::open(image_path)?
        .with_guessed_format()?
        .decode()?
        .to_rgb8();
    let img = match img.dimensions() == (w as u32, h as u32) {
        true => img,
        false => image::imageops::resize(&img, w as u32, h as u32, FilterType::Triangle),
    };
    // NCHW, pixels x / 255 normalised per channel: (x / 255 - mean[c]) / std[c]. A 1-channel
    // model takes the luma of the resized RGB image (BT.601 weights, rounded, as elrt does).
    let x = tract_ndarray::Array4::from_shape_fn((1, c, h, w), |(_, ch, y, x)| {
        let [r, g, b] = img.get_pixel(x as u32, y as u32).0.map(u32::from);
        let v = match c {
            1 => (299 * r + 587 * g + 114 * b + 500) / 1000,
            _ => [r, g, b][ch],
        };
        (v as f32 / 255.0 - mean[ch]) / std[ch]
    });

    let model = tract_onnx::onnx()
        .model_for_proto_model(&proto)?
        .with_input_fact(0, f32::fact([1, c, h, w]).into())?
        .into_optimized()?
        .into_runnable()?;
    let outputs = model.run(tvec!(Tensor::from(x).into_tvalue()))?;
    let out = outputs[0].to_plain_array_view::<f32>()?;

    // Probabilities: the softmax of the logits. elrt.output says what the file outputs: logits,
    // or, where the source model ended in a Softmax / LogSoftmax, probabilities / log-probabilities.
    // The softmax of log-probabilities gives the probabilities back, so only the former need
    // their logarithm first.
    let logits: Vec<f32> = match meta.get("elrt.output") {
        Some(&"probabilities") => out.iter().map(|p| p.ln()).collect(),
        _ => out.iter().copied().collect(),
    };
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let exp: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    // The five most likely classes.
    let mut order: Vec<usize> = (0..exp.len()).collect();
    order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]));
    for &k in order.iter().take(5) {
        let name = classes
            .get(k)
            .cloned()
            .unwrap_or_else(|| format!("class {k}"));
        println!("{:.6}  {name}", exp[k] / sum);
    }
    Ok(())
}
