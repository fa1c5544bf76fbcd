"""Router health statistics and metric writers (JSON lines, TensorBoard)."""
