from crm_syncd.cli import main

main()
