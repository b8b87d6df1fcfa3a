from llmsrec.cli import main

main()
