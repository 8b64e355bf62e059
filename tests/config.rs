//! The README's configuration table says what the code does: every setting of every service
//! has a row naming the service, with the default its settings table (the one place defaults
//! are written) gives.

use mesh_testkit::readme::check_readme_table;

#[test]
fn the_readme_documents_every_setting_of_every_service_with_its_default() {
    let readme = std::fs::read_to_string(mesh_tests::repo().join("README.md")).expect("README");
    let tables = [
        ("gateway", mesh_gateway::config::SETTINGS),
        ("features", mesh_features::SETTINGS),
        ("inference", mesh_inference::SETTINGS),
        ("logger", mesh_logger::SETTINGS),
    ];
    let problems: Vec<String> = tables
        .iter()
        .flat_map(|(service, table)| check_readme_table(&readme, service, table))
        .collect();
    assert!(problems.is_empty(), "README vs code: {problems:#?}");
    assert!(
        tables.iter().all(|(_, t)| t.len() > 5),
        "every table has its own settings"
    );
}
