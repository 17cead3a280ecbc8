//! safetensors round trip and the PyTorch layouts import accepts or refuses.

mod common;

use std::collections::HashMap;
use std::path::Path;

use lmc_probe::interop::{self, load_bytes};
use lmc_train::artifact::Provenance;
use lmc_train::params::Mask;
use safetensors::tensor::{Dtype, TensorView};

fn st(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (n.to_string(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, &None::<HashMap<String, String>>).unwrap()
}

#[test]
fn export_import_round_trip_keeps_params_mask_and_run() {
    let ds = common::digits();
    let dense = common::train(&ds, "mlp:8", None, 0, 1);
    let mut mask = Mask::dense(&dense.model.layout);
    for i in (0..512).step_by(3) {
        mask.keep[i] = false;
    }
    let run = common::train(&ds, "mlp:8", Some(mask.clone()), 0, 1);
    let prov = Provenance::of("test", &1, &[]);
    let bytes = interop::export_bytes(&run, prov, true).unwrap();
    let path = Path::new("x.safetensors");
    let loaded = load_bytes(path, &bytes).unwrap();
    // PyTorch state-dict names, plus torch.nn.utils.prune-style masks for weights only.
    let names: Vec<&str> = loaded.tensors.keys().map(|s| s.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "fc.bias",
            "fc.weight",
            "fc.weight_mask",
            "fc_layers.0.bias",
            "fc_layers.0.weight",
            "fc_layers.0.weight_mask"
        ]
    );
    assert_eq!(loaded.tensors["fc_layers.0.weight"].0, vec![8, 64]);
    assert_eq!(loaded.metadata["format"], "pt");
    assert_eq!(loaded.metadata["lmc.provenance"], prov.hex());
    let (params, m) = loaded.to_params(path, &run.model.layout, false).unwrap();
    assert_eq!(params, run.params);
    assert_eq!(m, run.mask);
    let meta = loaded.run_metadata(path).unwrap().unwrap();
    assert_eq!(
        (meta.model, meta.dataset, meta.start, meta.data_seed),
        (run.model.clone(), run.dataset.clone(), run.start.clone(), run.data_seed)
    );
    assert_eq!(meta.curve.len(), run.curve.len());

    // Without masks: a plain state dict, read back as a dense mask.
    let plain = load_bytes(path, &interop::export_bytes(&run, prov, false).unwrap()).unwrap();
    assert_eq!(plain.tensors.len(), 4);
    let (p2, m2) = plain.to_params(path, &run.model.layout, false).unwrap();
    assert_eq!(p2, run.params);
    assert_eq!(m2, Mask::dense(&run.model.layout));
}

#[test]
fn pytorch_pruned_state_dicts_and_bad_files() {
    let ds = common::digits();
    let run = common::train(&ds, "mlp:", None, 0, 1);
    let layout = &run.model.layout; // fc.weight (10, 64), fc.bias (10)
    let path = Path::new("torch.safetensors");
    let w: Vec<f32> = (0..640).map(|i| i as f32 * 0.01 - 3.0).collect();
    let b: Vec<f32> = (0..10).map(|i| i as f32).collect();
    let mut m: Vec<f32> = vec![1.0; 640];
    m[7] = 0.0;
    // torch.nn.utils.prune leaves weight_orig and weight_mask: the weight is their product.
    let f = load_bytes(
        path,
        &st(&[
            ("fc.weight_orig", vec![10, 64], w.clone()),
            ("fc.weight_mask", vec![10, 64], m.clone()),
            ("fc.bias", vec![10], b.clone()),
        ]),
    )
    .unwrap();
    let (p, mask) = f.to_params(path, layout, false).unwrap();
    assert_eq!(p.data[7], 0.0);
    assert_eq!(p.data[8], w[8]);
    assert!(!mask.keep[7] && mask.keep[8]);
    assert_eq!(&p.data[640..], &b[..]);
    assert!(f.run_metadata(path).unwrap().is_none());

    let err = |tensors: &[(&str, Vec<usize>, Vec<f32>)]| {
        load_bytes(path, &st(tensors))
            .unwrap()
            .to_params(path, layout, false)
            .unwrap_err()
            .to_string()
    };
    let e = err(&[("fc.weight", vec![64, 10], w.clone()), ("fc.bias", vec![10], b.clone())]);
    assert!(
        e.contains("torch.safetensors")
            && e.contains("'fc.weight' has shape [64, 10]")
            && e.contains("[10, 64]"),
        "{e}"
    );
    let e = err(&[("fc.weight", vec![10, 64], w.clone())]);
    assert!(e.contains("missing tensors") && e.contains("fc.bias"), "{e}");
    let e = err(&[
        ("fc.weight", vec![10, 64], w.clone()),
        ("fc.bias", vec![10], b.clone()),
        ("fc2.weight", vec![1], vec![0.0]),
    ]);
    assert!(e.contains("fc2.weight") && e.contains("--allow-extra"), "{e}");
    let mut half = m.clone();
    half[0] = 0.5;
    let e = err(&[
        ("fc.weight", vec![10, 64], w.clone()),
        ("fc.weight_mask", vec![10, 64], half),
        ("fc.bias", vec![10], b.clone()),
    ]);
    assert!(e.contains("0/1"), "{e}");
    let e = err(&[
        ("fc.weight", vec![10, 64], w.clone()),
        ("fc.bias", vec![10], b.clone()),
        ("fc.bias_mask", vec![10], vec![1.0; 10]),
    ]);
    assert!(e.contains("not prunable"), "{e}");
    let mut nan = w.clone();
    nan[3] = f32::NAN;
    let e = err(&[("fc.weight", vec![10, 64], nan), ("fc.bias", vec![10], b.clone())]);
    assert!(e.contains("non-finite"), "{e}");
    assert!(load_bytes(path, b"not a safetensors file")
        .unwrap_err()
        .to_string()
        .contains("not a valid safetensors"));
}
