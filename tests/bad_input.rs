//! Bad input gives one clear error line naming the file and the node or field, a non-zero
//! exit, and never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use onnx_protobuf::{Message, ModelProto};

fn resnet20() -> ModelProto {
    let bytes = std::fs::read(common::repo().join("models/resnet20.onnx")).unwrap();
    ModelProto::parse_from_bytes(&bytes).unwrap()
}

fn save(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Runs `elrt inspect` and returns its stderr after checking the failure is clean.
fn inspect_fails(path: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_elrt"))
        .arg("inspect")
        .arg(path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{}: should fail", path.display());
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected, got: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains(&path.display().to_string()),
        "file not named: {err}"
    );
    err
}

#[test]
fn truncated_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = resnet20().write_to_bytes().unwrap();
    for cut in [10, bytes.len() / 3, bytes.len() / 2, bytes.len() - 7] {
        let p = save(tmp.path(), &format!("cut{cut}.onnx"), &bytes[..cut]);
        let err = inspect_fails(&p);
        assert!(
            err.contains("truncated") || err.contains("reads") || err.contains("no node"),
            "{err}"
        );
    }
}

#[test]
fn not_onnx() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("text.onnx", b"hello, this is not a model\n".to_vec()),
        ("empty.onnx", vec![]),
        (
            "png.onnx",
            b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10".to_vec(),
        ),
    ] {
        let err = inspect_fails(&save(tmp.path(), name, &bytes));
        assert!(err.contains("not an ONNX model"), "{name}: {err}");
    }
}

#[test]
fn missing_file() {
    let err = inspect_fails(Path::new("/nonexistent/model.onnx"));
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn unknown_op_is_named_with_its_node() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = resnet20();
    let g = m.graph.as_mut().unwrap();
    let k = g.node.iter().position(|n| n.op_type == "Relu").unwrap();
    g.node[k].op_type = "FancyActivation".into();
    let node = g.node[k].name.clone();
    let err = inspect_fails(&save(
        tmp.path(),
        "unknown.onnx",
        &m.write_to_bytes().unwrap(),
    ));
    assert!(
        err.contains("FancyActivation") && err.contains(&node),
        "{err}"
    );
    assert!(err.contains("not supported"), "{err}");
}

#[test]
fn quantized_op_says_quantized() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = resnet20();
    let g = m.graph.as_mut().unwrap();
    let k = g.node.iter().position(|n| n.op_type == "Conv").unwrap();
    g.node[k].op_type = "QLinearConv".into();
    let node = g.node[k].name.clone();
    let err = inspect_fails(&save(tmp.path(), "q.onnx", &m.write_to_bytes().unwrap()));
    assert!(err.contains("QLinearConv") && err.contains(&node), "{err}");
    assert!(err.contains("quantized models"), "{err}");
}

#[test]
fn missing_initializer() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = resnet20();
    let g = m.graph.as_mut().unwrap();
    let conv = g.node.iter().find(|n| n.op_type == "Conv").unwrap().clone();
    let w = conv.input[1].clone();
    g.initializer.retain(|t| t.name != w);
    let err = inspect_fails(&save(
        tmp.path(),
        "noinit.onnx",
        &m.write_to_bytes().unwrap(),
    ));
    assert!(err.contains(&w) && err.contains(&conv.name), "{err}");
}

#[test]
fn inconsistent_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = resnet20();
    let g = m.graph.as_mut().unwrap();
    // The second conv reads 16 channels; give it a weight that expects 8.
    let conv = g
        .node
        .iter()
        .filter(|n| n.op_type == "Conv")
        .nth(1)
        .unwrap()
        .clone();
    let t = g
        .initializer
        .iter_mut()
        .find(|t| t.name == conv.input[1])
        .unwrap();
    let (co, kh, kw) = (t.dims[0], t.dims[2], t.dims[3]);
    t.dims = vec![co, 8, kh, kw];
    t.raw_data = vec![0u8; (co * 8 * kh * kw * 4) as usize];
    t.float_data.clear();
    let err = inspect_fails(&save(
        tmp.path(),
        "shapes.onnx",
        &m.write_to_bytes().unwrap(),
    ));
    assert!(
        err.contains(&conv.name) && err.contains("inconsistent shapes"),
        "{err}"
    );
}

#[test]
fn raw_data_of_wrong_size() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = resnet20();
    let g = m.graph.as_mut().unwrap();
    let t = g
        .initializer
        .iter_mut()
        .find(|t| t.dims.len() == 4)
        .unwrap();
    let name = t.name.clone();
    t.raw_data.truncate(t.raw_data.len() - 4);
    let err = inspect_fails(&save(tmp.path(), "raw.onnx", &m.write_to_bytes().unwrap()));
    assert!(err.contains(&name) && err.contains("raw_data"), "{err}");
}

#[test]
fn unsupported_opset() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = resnet20();
    m.opset_import[0].version = 6;
    let err = inspect_fails(&save(tmp.path(), "op6.onnx", &m.write_to_bytes().unwrap()));
    assert!(err.contains("opset 6"), "{err}");
}

#[test]
fn bad_input_shape_flag() {
    let model = common::repo().join("models/resnet20.onnx");
    for (shape, want) in [
        ("1,3,32", "does not fit"),
        ("1,a,32,32", "not a dimension"),
        ("1,4,32,32", "does not fit"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_elrt"))
            .args(["inspect", model.to_str().unwrap(), "--input-shape", shape])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(want), "{shape}: {err}");
    }
}

/// Structured fuzzing: ResNet-20 with one or two random corruptions (an attribute value, an
/// initializer dimension, a node input, an op type, a dropped node, the input shape). Reading,
/// shape inference, compiling and one forward pass must each either work or return an error:
/// never panic. `ELRT_PROPTEST_CASES` runs more cases.
#[test]
fn corrupted_models_give_errors_not_panics() {
    use proptest::prelude::*;

    let base = resnet20();
    // ELRT_PROPTEST_CASES=N for a longer (still deterministic) hunt.
    let (mut runner, cases) = common::prop_runner(128);
    let values = [-3i64, -1, 0, 1, 2, 3, 7, i64::MAX, i64::MIN];
    let ops = [
        "Relu",
        "Add",
        "Conv",
        "Flatten",
        "GlobalAveragePool",
        "Gemm",
        "Identity",
    ];
    let mutation = (
        0..6usize,
        any::<u32>(),
        any::<u32>(),
        0..values.len(),
        0..ops.len(),
    );
    let outcomes = std::cell::Cell::new([0usize; 2]);
    runner
        .run(&prop::collection::vec(mutation, 1..3), |muts| {
            let mut m = base.clone();
            let g = m.graph.as_mut().unwrap();
            for (kind, a, b, v, op) in muts {
                let value = values[v];
                match kind {
                    0 => {
                        let k = a as usize % g.node.len();
                        let n = &mut g.node[k];
                        let j = b as usize % n.attribute.len().max(1);
                        if let Some(at) = n.attribute.get_mut(j) {
                            if at.ints.is_empty() {
                                at.i = value;
                            } else {
                                let k = (b as usize / 7) % at.ints.len();
                                at.ints[k] = value;
                            }
                        }
                    }
                    1 => {
                        let k = a as usize % g.initializer.len();
                        let t = &mut g.initializer[k];
                        if !t.dims.is_empty() {
                            let k = b as usize % t.dims.len();
                            t.dims[k] = value;
                        }
                    }
                    2 => {
                        let names: Vec<String> =
                            g.initializer.iter().map(|t| t.name.clone()).collect();
                        let k = a as usize % g.node.len();
                        let n = &mut g.node[k];
                        if !n.input.is_empty() {
                            let k = b as usize % n.input.len();
                            n.input[k] = match v % 3 {
                                0 => String::new(),
                                1 => "no_such_value".into(),
                                _ => names[b as usize % names.len()].clone(),
                            };
                        }
                    }
                    3 => {
                        let k = a as usize % g.node.len();
                        g.node[k].op_type = ops[op].into();
                    }
                    4 => {
                        let k = a as usize % g.node.len();
                        g.node.remove(k);
                    }
                    _ => {
                        let dims = &mut g.input[0]
                            .type_
                            .as_mut()
                            .unwrap()
                            .mut_tensor_type()
                            .shape
                            .as_mut()
                            .unwrap()
                            .dim;
                        let k = a as usize % dims.len();
                        // Valid but large sizes would only make the forward slow; keep them small.
                        dims[k].set_dim_value(value.clamp(i64::MIN, 40));
                    }
                }
            }
            let ran = elrt::onnx::read::read_model(&m)
                .and_then(|graph| elrt::engine::model::Model::from_graph(graph, 2))
                .and_then(|mut model| {
                    let x = ndarray::ArrayD::zeros(model.input_shape.clone());
                    model.forward(x, elrt::engine::exec::Mode::Eval)
                });
            outcomes.set([
                outcomes.get()[0] + ran.is_ok() as usize,
                outcomes.get()[1] + ran.is_err() as usize,
            ]);
            Ok(())
        })
        .unwrap();
    // Both sides were exercised: corruptions that still run and ones that are refused.
    let [ok, refused] = outcomes.get();
    assert!(
        ok > 0 && refused > cases as usize / 4,
        "{ok} ran, {refused} refused"
    );
}

/// A model whose input is declared 2^40 pixels high: every command refuses it with the size it
/// would take, instead of aborting in an allocation (issue 19).
#[test]
fn an_input_too_large_for_memory_is_refused_with_its_size() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = resnet20();
    let dims = &mut m.graph.as_mut().unwrap().input[0].type_.as_mut().unwrap();
    if let Some(onnx_protobuf::type_proto::Value::TensorType(t)) = dims.value.as_mut() {
        t.shape.as_mut().unwrap().dim[2].value =
            Some(onnx_protobuf::tensor_shape_proto::dimension::Value::DimValue(1 << 40));
    }
    let path = save(tmp.path(), "huge.onnx", &m.write_to_bytes().unwrap());
    let p = path.to_str().unwrap();
    let out = tmp.path().join("out.onnx");
    let o = out.to_str().unwrap();
    let run = tmp.path().join("run");
    for args in [
        vec!["inspect", p],
        vec!["train", p, "--max-steps", "1", "-o", o],
        vec!["export", p, "-o", o],
        vec!["compress", p, "--out", run.to_str().unwrap()],
    ] {
        let err = common::fails_cleanly(&args);
        assert!(
            err.contains("of memory, more than this machine has"),
            "{args:?}: {err}"
        );
    }
    assert!(!run.exists() && !out.exists());
    let err = common::fails_cleanly(&[
        "train",
        common::repo()
            .join("models/resnet20.onnx")
            .to_str()
            .unwrap(),
        "--data",
        "synthetic:100000000000,10",
        "-o",
        o,
    ]);
    assert!(err.contains("100000000010 images"), "{err}");
}

/// A weight that is NaN fails the export, named, instead of passing a check that compares NaN
/// with NaN (issue 19).
#[test]
fn a_nan_weight_fails_the_export_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(common::repo().join("models/resnet20_eval.onnx")).unwrap();
    let mut m = ModelProto::parse_from_bytes(&bytes).unwrap();
    let t = m
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.dims.len() == 4)
        .unwrap();
    let name = t.name.clone();
    t.raw_data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let path = save(tmp.path(), "nan.onnx", &m.write_to_bytes().unwrap());
    let out = tmp.path().join("c.onnx");
    let err = common::fails_cleanly(&[
        "export",
        path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        err.contains(&format!("initializer '{name}'")) && err.contains("NaN"),
        "{err}"
    );
    assert!(!out.exists());
    // The check itself calls outputs with NaN different, not equal.
    let a = ndarray::ArrayD::from_elem(ndarray::IxDyn(&[2]), f32::NAN);
    assert!(elrt::export::validate::rel_diff(&a, &a).is_nan());
}

/// A conv weight of rank 1: train refuses it as the other commands do (it panicked, issue 19).
#[test]
fn a_one_dimensional_conv_weight_is_refused_by_train() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = resnet20();
    let t = m
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name == "conv1.weight")
        .unwrap();
    t.dims = vec![432];
    let path = save(tmp.path(), "w1d.onnx", &m.write_to_bytes().unwrap());
    let out = tmp.path().join("t.onnx");
    let err = common::fails_cleanly(&[
        "train",
        path.to_str().unwrap(),
        "--max-steps",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        err.contains("'/conv1/Conv'") && err.contains("[432]"),
        "{err}"
    );
}

/// The flags and values issue 19 found unchecked: each gets one line naming the flag or value
/// at fault, and writes nothing.
#[test]
fn unchecked_flags_and_values_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::repo().join("models/resnet20.onnx");
    let eval_model = common::repo().join("models/resnet20_eval.onnx");
    let m = model.to_str().unwrap();
    let e = eval_model.to_str().unwrap();
    let out = tmp.path().join("out.onnx");
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["bench", e, "--min-seconds", "inf"], "--min-seconds"),
        (vec!["export", e, "-o", o, "--opset", "5"], "--opset 5"),
        (vec!["export", e, "-o", o, "--opset", "99"], "--opset 99"),
        (
            vec!["export", e, "-o", o, "--tolerance", "NaN"],
            "--tolerance",
        ),
        (vec!["train", m, "--epochs", "0", "-o", o], "--epochs"),
        (vec!["train", m, "--momentum", "NaN", "-o", o], "--momentum"),
        (vec!["train", m, "--lr", "-0.1", "-o", o], "--lr"),
        (vec!["train", m, "--max-steps", "0", "-o", o], "--max-steps"),
        (
            vec!["train", m, "--bn-momentum", "1.5", "-o", o],
            "--bn-momentum 1.5",
        ),
        (
            vec!["compress", m, "--bn-momentum", "0", "--out", o],
            "--bn-momentum 0",
        ),
        (
            vec!["inspect", m, "--input-shape", "1,3,x,32"],
            "'x' is not a dimension",
        ),
    ];
    for (args, want) in cases {
        let err = common::fails_cleanly(&args);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote {o}");
    }
}

/// A learning rate that makes training diverge stops with a message that names no checkpoint
/// when none was written (it named a file that did not exist).
#[test]
fn a_diverging_run_names_only_a_checkpoint_that_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t.onnx");
    let err = common::fails_cleanly(&[
        "train",
        common::repo()
            .join("models/resnet20.onnx")
            .to_str()
            .unwrap(),
        "--data",
        "synthetic:64,16",
        "--batch",
        "16",
        "--lr",
        "1e30",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        err.contains("diverged") && err.contains("no checkpoint had been written yet"),
        "{err}"
    );
    // Nothing of the failed run is left: no model, no metrics or curve without a checkpoint.
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A model with two image inputs is refused as such, not with a shape error from inside it.
#[test]
fn two_inputs_are_named_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = resnet20();
    let g = m.graph.as_mut().unwrap();
    let mut second = g.input[0].clone();
    second.name = "second_image".into();
    g.input.push(second);
    let first_conv = g.node.iter_mut().find(|n| n.op_type == "Add").unwrap();
    first_conv.input[1] = "second_image".into();
    let path = save(tmp.path(), "two.onnx", &m.write_to_bytes().unwrap());
    let out = tmp.path().join("t.onnx");
    let err = common::fails_cleanly(&[
        "train",
        path.to_str().unwrap(),
        "--max-steps",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        err.contains("2 inputs") && err.contains("'second_image'"),
        "{err}"
    );
}

/// `elrt eval` reads the test split only: a damaged training file of a CIFAR folder is not in
/// its way (it failed on it).
#[test]
fn eval_reads_only_the_test_split() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar");
    std::fs::create_dir_all(&dir).unwrap();
    let mut test = Vec::new();
    for i in 0..20u32 {
        test.push((i % 10) as u8);
        test.extend((0..3072u32).map(|k| ((k * 7 + i * 13) % 256) as u8));
    }
    std::fs::write(dir.join("test_batch.bin"), &test).unwrap();
    for k in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{k}.bin")), b"damaged").unwrap();
    }
    let out = common::succeeds([
        "eval",
        common::repo()
            .join("models/resnet20.onnx")
            .to_str()
            .unwrap(),
        "--data",
        &format!("cifar10:{}", dir.display()),
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["images"], 20);
    // train needs the training split and names the damaged file.
    let err = common::fails_cleanly(&[
        "train",
        common::repo()
            .join("models/resnet20.onnx")
            .to_str()
            .unwrap(),
        "--data",
        &format!("cifar10:{}", dir.display()),
        "-o",
        tmp.path().join("t.onnx").to_str().unwrap(),
    ]);
    assert!(err.contains("data_batch_1.bin"), "{err}");
}
