//! Prints the ImageIndex CustomResourceDefinition as YAML (the source of crds/imageindex.yaml).

use imageindex_crds::ImageIndex;
use kube::CustomResourceExt;

fn main() {
    match serde_yaml::to_string(&ImageIndex::crd()) {
        Ok(yaml) => print!("{yaml}"),
        Err(e) => {
            eprintln!("error: cannot render the CRD: {e}");
            std::process::exit(1);
        }
    }
}
