"""What ROME/MEMIT define: keys K_E, target vectors z, key statistics C0."""
