"""ddmpi: domain-decomposition training of CNN image classifiers under MPI.

Each MPI rank owns subdomains of every input image, trains one local CNN per subdomain, and a
coarse dense network on rank 0 combines the gathered local decisions (Klawonn, Lanser & Weber,
SIAM J. Sci. Comput. 46(5), 2024).
"""

__version__ = "0.1.0"
