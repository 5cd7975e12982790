"""Starting radixserve: the CLI (`cli`), `radixserve serve` (`serve`), process supervision
(`supervisor`) and the offline `Engine` (`engine`). The only code that imports a `*_proc` package."""
