"""Infrastructure: Ray sessions, cluster files, KubeRay manifests, run storage, the hub, the real assets,
raymeta's home folders and file helpers. Each module stands alone; nothing is imported here."""
