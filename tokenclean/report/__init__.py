"""What a finished experiment reports: the tables (``table``), the significance of every row against full SFT
(``significance``), the figures (``figures``), which tokens each selection kept (``quality``) and the token-level
HTML view (``token_view``). Each module is one `tokenclean` command's work and reads only finished artifacts."""
