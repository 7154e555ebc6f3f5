from cxrmax.cli import main

main()
